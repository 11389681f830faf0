"""`moe-expert-server`: serve some routed experts of a checkpoint over gRPC."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from moe_client import wire
from moe_client.ownership import format_ownership
from moe_client.pb import admin_pb2_grpc, experts_pb2
from moe_serve.expert_server.admin import SERVICE_NAME as ADMIN_SERVICE
from moe_serve.expert_server.admin import AdminAuth, AdminServicer
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.capacity import capacities, parse_capacity
from moe_serve.expert_server.config import DTYPES, ExpertServerConfig, build_parser, config_from_args
from moe_serve.expert_server.live_placement import LivePlacement
from moe_serve.expert_server.servicer import ExpertServicer, add_to_server, server_info
from moe_serve.expert_server.side_calls import SideCalls
from moe_serve.model.checkpoint import Checkpoint, CheckpointError
from moe_serve.model.placement import PlacementError, resolve_ownership
from moe_serve.observability.logs import configure_logging
from moe_serve.observability.metrics import MetricsInterceptor, ServiceMetrics
from moe_serve.process.console import RULE, LoadProgress, summary
from moe_serve.process.devices import describe_devices, parse_devices
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.process.threads import set_torch_threads
from moe_serve.rpc.message_limits import message_limit
from moe_serve.rpc.ports import check_port_free
from moe_serve.rpc.server import ServerHandle, serve_until_signal, start_server

SERVICE_NAME = experts_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
LIMITED = [f"/{SERVICE_NAME}/RunExperts"]  # counted against --max-queue


def describe_count(owned: dict[int, list[int]]) -> str:
    """'8 experts (4 in each of 2 MoE layers)': the (layer, expert) pairs the progress bar counts."""
    counts = {len(ids) for ids in owned.values()}
    total = sum(len(ids) for ids in owned.values())
    if len(counts) == 1 and len(owned) > 1:
        return f"{total} experts ({counts.pop()} in each of {len(owned)} MoE layers)"
    return f"{total} experts over {len(owned)} MoE layer(s)"


def placement_lines(placement) -> list[str]:
    """'  Expert 0 → cpu' per owned expert, under its layer's name when layers differ (the seed's lines)."""
    by_layer: dict[int, list[str]] = {}
    for placed in sorted(placement, key=lambda p: (p.layer, p.expert)):
        by_layer.setdefault(placed.layer, []).append(f"Expert {placed.expert} → {placed.device}")
    if len({tuple(v) for v in by_layer.values()}) == 1:  # every layer alike: the seed's lines once
        return [f"  {line}  (every MoE layer)" for line in next(iter(by_layer.values()))]
    return [f"  Layer {layer}: {', '.join(lines)}" for layer, lines in by_layer.items()]


def load_bank(config: ExpertServerConfig, verbose: bool = True) -> tuple[ExpertBank, Checkpoint]:
    """Open the checkpoint, resolve the owned experts, load them onto the devices."""
    checkpoint = Checkpoint(config.checkpoint)
    spec = checkpoint.spec
    owned = resolve_ownership(spec, config.experts)
    devices = parse_devices(config.devices)
    if verbose:
        for line in describe_devices():
            print(line)
        print(f"Checkpoint: {checkpoint.path} ({spec.model_type}, hidden {spec.hidden_size}, "
              f"{len(spec.moe_layers)} MoE layers x {spec.num_experts} experts, top-{spec.top_k})")
        print(f"Distributing {describe_count(owned)} across {len(devices)} device(s) "
              f"({', '.join(str(d) for d in devices)}), dtype {config.dtype}")
    progress = LoadProgress(sum(len(ids) for ids in owned.values())) if verbose else None
    bank = ExpertBank.load(checkpoint, owned, devices, DTYPES[config.dtype], progress,
                           cuda_graph_tokens=config.cuda_graph_tokens)
    if verbose:
        for line in placement_lines(bank.placement()):
            print(line)
        print(f"Owned experts: {'; '.join(format_ownership(bank.owned))}  ({bank.nbytes() / 2**20:.1f} MiB)")
    return bank, checkpoint


async def create_server(config: ExpertServerConfig, verbose: bool = False) -> tuple[ServerHandle, ExpertServicer]:
    """Load the bank and start serving on config.address; returns the running server."""
    check_port_free(config.host, config.port)  # before loading anything: a busy port is one line at once
    if config.tcp_channel_port > 0:
        check_port_free(config.host, config.tcp_channel_port, "--tcp-channel-port")
    bank, checkpoint = load_bank(config, verbose)
    fingerprint = checkpoint.fingerprint()
    metrics = ServiceMetrics("expert_server")
    devices = parse_devices(config.devices)
    capacity = capacities(devices, parse_capacity(config.expert_capacity))
    servicer: ExpertServicer | None = None
    spec = checkpoint.spec
    serving = config.serving.with_message_limit(message_limit(spec.hidden_size, spec.top_k, config.max_tokens))
    admin: AdminServicer | None = None
    name = config.name

    def on_change() -> None:  # the served experts or the version changed: GetInfo and metrics follow
        info = server_info(bank, fingerprint, checkpoint.spec, name, config.shared_memory, admin.live.version,
                           admin.live.listed())
        if servicer.side is not None:
            info.local_address = servicer.side.address
            info.tcp_channel_port = servicer.side.tcp_port
        servicer.info = info
        metrics.init_experts(bank.owned)
        held = bank.nbytes_by_device()
        for device in capacity:
            metrics.weight_bytes.labels(device).set(held.get(device, 0))

    def register(server) -> None:
        nonlocal servicer, admin
        servicer = ExpertServicer(bank, experts_pb2.GetInfoResponse(), metrics=metrics, merge=config.merge_calls)
        servicer.max_reply_bytes = serving.max_message_bytes
        add_to_server(servicer, server)
        live = LivePlacement(bank, checkpoint, devices, capacity, servicer.calls, on_change)
        admin = AdminServicer(live, AdminAuth(config.admin_token, config.serving.require_client_cert),
                              metrics.expert_tokens)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)

    handle = await start_server(config.address, register, [SERVICE_NAME, ADMIN_SERVICE], serving, LIMITED,
                                [MetricsInterceptor(metrics, [SERVICE_NAME])])
    name = admin.name = config.name or f"{socket.gethostname()}:{handle.port}"
    tcp = config.tcp_channel_port >= 0 and not config.host.startswith("unix:")
    if (config.shared_memory or tcp) and config.serving.tls is None:
        # Callers may skip gRPC for RunExperts (side_calls.py): same-host ones over a Unix socket, others over
        # TCP. Not beside TLS: the side channel admits by user id and token, not by certificate, unencrypted.
        side = servicer.side = SideCalls(servicer, config.serving.auth_token, serving.max_message_bytes,
                                         unix=config.shared_memory,
                                         tcp=(config.host, config.tcp_channel_port) if tcp else None)

        async def close_side() -> None:  # after the gRPC drain: side-channel callers fail over meanwhile
            await asyncio.to_thread(side.close)

        handle.on_stop = close_side
    on_change()
    metrics.describe(name=name, model_fingerprint=fingerprint, model_type=checkpoint.spec.model_type,
                     dtype=config.dtype)
    return handle, servicer


async def _serve(config: ExpertServerConfig) -> None:
    keep_large_buffers()  # reuse tensor-sized message buffers instead of mmap-ing fresh ones per call
    set_torch_threads(config.torch_threads, parse_devices(config.devices))  # before any compute thread starts
    print(RULE)
    print(f"Starting expert server {config.name or config.address}")
    print(RULE)
    start = time.monotonic()
    handle, servicer = await create_server(config, verbose=True)
    where = config.host if config.host.startswith("unix:") else f"{config.host}:{handle.port}"
    info = servicer.info
    print(summary(f"Expert server {info.server_name}", [
        ("gRPC", f"{where} (ExpertService, grpc.health.v1, reflection)"),
        ("metrics", servicer.metrics.expose(config.metrics_host, config.metrics_port)),
        ("checkpoint", f"{config.checkpoint} ({info.model_type}, fingerprint {info.model_fingerprint})"),
        ("experts", f"{'; '.join(format_ownership(servicer.bank.owned))} in {wire.dtype_name(info.compute_dtype)}"),
        ("devices", ", ".join(info.devices)),
        ("admin", "AdminService with the admin token" if config.admin_token else
         "AdminService with client certificates" if config.serving.require_client_cert else
         "off (no --admin-token-file, no mutual TLS)"),
        ("loaded in", f"{time.monotonic() - start:.1f} s"),
    ]))
    print(f"Expert server {servicer.info.server_name} (model {servicer.info.model_fingerprint}) "
          f"ready on {where} and waiting for requests...", flush=True)
    await serve_until_signal(handle, config.grace_seconds)
    servicer.executor.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of moe-expert-server."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
        asyncio.run(_serve(config))
    except (CheckpointError, PlacementError, ValueError, OSError) as err:
        print(f"moe-expert-server: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
