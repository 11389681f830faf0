"""`moe-gateway`: the router and dense layers, scattering tokens to expert servers over gRPC."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import replace

from moe_client import wire
from moe_client.ownership import format_ownership, to_messages
from moe_client.pb import gateway_pb2
from moe_serve.gateway.batching_config import (
    start_batching,
)
from moe_serve.gateway.config import DTYPES, GatewayConfig, build_parser, config_from_args
from moe_serve.gateway.coverage import CoverageHealth
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.engine import GatewayEngine
from moe_serve.gateway.pool import PoolOptions, Replica, ServerPool, StartupError
from moe_serve.gateway.servicer import GatewayServicer, add_to_server
from moe_serve.gateway.shared_gpu import calls_go_unwaited, choose_overlap, context_switch_warning
from moe_serve.gateway.wire_choice import WireChoice
from moe_serve.model.checkpoint import Checkpoint, CheckpointError
from moe_serve.model.loader import load_dense_model
from moe_serve.model.placement import PlacementError, read_placement, resolve_ownership
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.observability.logs import configure_logging
from moe_serve.observability.metrics import MetricsInterceptor, ServiceMetrics
from moe_serve.process.console import RULE, summary
from moe_serve.process.devices import parse_devices
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.process.threads import set_torch_threads
from moe_serve.rpc import shm_files, stream_signals
from moe_serve.rpc.message_limits import message_limit
from moe_serve.rpc.ports import check_port_free
from moe_serve.rpc.server import ServerHandle, serve_until_signal, start_server
from moe_serve.rpc.shared_regions import SHM_DIR, ArenaPool, kind_names

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
LIMITED = [f"/{SERVICE_NAME}/Forward", f"/{SERVICE_NAME}/Generate"]  # counted against --max-queue
log = logging.getLogger(__name__)


def _check_placement(checkpoint: Checkpoint, placement: str, servers: list[Replica]) -> None:
    """Every expert the placement file gives a server must really be on that server (each address of it that
    answered: the gateway starts once the servers that answered cover the model, and one still silent then, whose
    experts are unknown, joins later with what it reports, as any server does)."""
    for entry in read_placement(placement):
        expected = resolve_ownership(checkpoint.spec, entry.experts)
        for server in (s for s in servers if s.target == entry.address and s.answered):
            owned = server.owned
            absent = [f"layer {layer}: {sorted(set(ids) - set(owned.get(layer, ())))}"
                      for layer, ids in expected.items() if set(ids) - set(owned.get(layer, ()))]
            if absent:
                raise StartupError(f"placement file {placement}: server {entry.name} ({server.address}) does not "
                                   f"hold " + "; ".join(absent) + f"; it holds {'; '.join(format_ownership(owned))}")


def model_info(checkpoint: Checkpoint, fingerprint: str, servers: list[Replica], dense_dtype: str,
               has_tokenizer: bool = False, wire_dtype: str = "float32"):
    """The GetModelInfo answer; `servers` are the ones serving now."""
    spec = checkpoint.spec
    return gateway_pb2.GetModelInfoResponse(
        model_type=spec.model_type, model_fingerprint=fingerprint, hidden_size=spec.hidden_size,
        num_layers=spec.num_layers, moe_layers=list(spec.moe_layers), num_experts=spec.num_experts,
        top_k=spec.top_k, dense_dtype=wire.dtype_from_name(dense_dtype),
        servers=[gateway_pb2.ExpertServerInfo(address=s.address, model_fingerprint=s.info.model_fingerprint,
                                              devices=list(s.info.devices), owned=to_messages(s.owned),
                                              name=s.info.server_name, compute_dtype=s.info.compute_dtype)
                 for s in servers],
        vocab_size=spec.vocab_size, max_position_embeddings=spec.max_position_embeddings if spec.has_attention else 0,
        has_tokenizer=has_tokenizer, eos_token_ids=list(spec.eos_token_ids),
        wire_dtype=wire.dtype_from_name(wire_dtype),
    )


def print_mapping(pool: ServerPool, shared_memory: bool = True) -> None:
    """The seed's 'Expert-to-worker mapping', per MoE layer; an expert with replicas lists them all."""
    for server in pool.members:
        kinds = kind_names(server.shared_kinds) if shared_memory else []
        how = f", same host: tensors through shared memory ({', '.join(kinds)})" if kinds else ""
        print(f"  {server.name} at {server.address}: experts {'; '.join(format_ownership(server.owned))} "
              f"on {', '.join(server.info.devices)} ({wire.dtype_name(server.info.compute_dtype)}){how}")
    for layer in pool.spec.moe_layers:
        owners = pool.owners.get(layer, {})
        names = {e: [r.name for r in owners.get(e, [])] for e in range(pool.spec.num_experts)}
        mapping = {e: n[0] if len(n) == 1 else n for e, n in names.items()}
        print(f"Expert-to-server mapping, layer {layer}: {mapping}")


def _remove_stale_regions() -> None:
    """Regions that gateways of this user killed with SIGKILL left in /dev/shm (moe-<pid>-*) go."""
    removed = shm_files.remove_stale(SHM_DIR)
    if removed:
        log.info("removed %d stale shared-memory region(s) of dead processes: %s", len(removed), ", ".join(removed))


async def create_gateway(config: GatewayConfig, verbose: bool = False) -> tuple[ServerHandle, GatewayServicer]:
    """Connect to the expert servers, check they cover the model, and start serving."""
    check_port_free(config.host, config.port)  # before loading anything: a busy port is one line at once
    checkpoint = Checkpoint(config.checkpoint)
    fingerprint = checkpoint.fingerprint()
    # Before any server is asked: a missing or misshapen tensor fails the start at once, naming it.
    model = load_dense_model(checkpoint, DTYPES[config.dense_dtype], parse_devices(config.dense_device)[0])
    tokenizer = TextTokenizer.from_checkpoint(checkpoint.path) if checkpoint.spec.has_attention else None
    addresses = list(config.servers)
    if config.placement:
        addresses = addresses or [e.address for e in read_placement(config.placement)]
    if verbose:
        spec = checkpoint.spec
        print(f"Checkpoint: {checkpoint.path} ({spec.model_type}, fingerprint {fingerprint}, hidden "
              f"{spec.hidden_size}, MoE layers {list(spec.moe_layers)} x {spec.num_experts} experts, top-{spec.top_k})")
        print(f"Connecting to {len(addresses)} expert server(s): {', '.join(addresses)}", flush=True)
    if verbose and checkpoint.spec.has_attention:
        spec = checkpoint.spec
        dense = [layer for layer in range(spec.num_layers) if not spec.is_moe_layer(layer)]
        has_tok = (checkpoint.path / "tokenizer.json").is_file()
        print(f"Causal LM: {spec.num_layers} decoder layers (dense MLP: {dense or 'none'}), {spec.num_heads} heads "
              f"/ {spec.num_kv_heads} KV heads of {spec.head_dim}, vocab {spec.vocab_size}, context "
              f"{spec.max_position_embeddings}, tokenizer.json {'yes' if has_tok else 'no'}")
    spec = checkpoint.spec
    # The expert servers derive theirs alike (same model, same --max-tokens default).
    serving = config.serving.with_message_limit(message_limit(spec.hidden_size, spec.top_k, config.max_tokens))
    pool = ServerPool(addresses, checkpoint.spec, fingerprint,
                      PoolOptions(rpc_timeout=config.rpc_timeout, resolve_interval=config.resolve_interval,
                                  keepalive=config.keepalive, tls=config.expert_tls, tcp_lanes=config.tcp_lanes,
                                  min_piece_bytes=config.min_piece_bytes, pieces_per_lane=config.pieces_per_lane,
                                  max_message_bytes=serving.max_message_bytes,
                                  local_calls=config.shared_memory and config.same_host_calls,
                                  shared_memory=config.shared_memory, tcp_calls=config.tcp_calls))
    await pool.start(config.connect_timeout)
    try:
        if config.placement and not config.servers:
            _check_placement(checkpoint, config.placement, pool.members)
    except (StartupError, PlacementError):
        await pool.close()
        raise
    if verbose:
        print_mapping(pool, config.shared_memory)
    if config.shared_memory:
        _remove_stale_regions()
    metrics = ServiceMetrics("gateway")
    metrics.describe(model_fingerprint=fingerprint, model_type=checkpoint.spec.model_type, dtype=config.dense_dtype)
    dispatcher = ExpertDispatcher(checkpoint.spec, pool, asyncio.get_running_loop(),
                                  wire.dtype_from_name(config.wire_dtype), config.rpc_timeout, metrics,
                                  ArenaPool() if config.shared_memory else None,
                                  wire_choice=WireChoice.of(config.wire_dtype, config.reply_wire_dtype,
                                                            config.full_precision_below_tokens),
                                  device_routing=None if config.routed_calls else False,
                                  pipelined_calls=config.pipelined_calls)
    dense = parse_devices(config.dense_device)[0]
    if config.pipelined_calls and dense.type == "cuda":
        stream_signals.available(dense)  # tried now, before any thread may be capturing a CUDA graph
    engine = GatewayEngine(model, dispatcher, tokenizer)

    def info() -> gateway_pb2.GetModelInfoResponse:  # GetModelInfo lists the servers serving now
        return model_info(checkpoint, fingerprint, pool.live(), config.dense_dtype, tokenizer is not None,
                          config.wire_dtype)

    unwaited = calls_go_unwaited(config.pipelined_calls and config.routed_calls and config.shared_memory
                                 and config.same_host_calls, model.device, pool)
    overlap, why = choose_overlap(config.batching.overlap, model.device, pool.members, unwaited=unwaited)
    log.info("micro-batch overlap %s: %s", "on" if overlap else "off", why)
    warning = context_switch_warning(model.device, pool.members)
    if warning:
        log.warning(warning)
    batching = start_batching(replace(config.batching, overlap=overlap), model, dispatcher, tokenizer)
    servicer = GatewayServicer(engine, info(), config.max_tokens, max_new_tokens=config.max_new_tokens,
                               metrics=metrics, batcher=batching.batcher, scheduler=batching.scheduler)
    servicer.max_reply_bytes = serving.max_message_bytes
    # Requests that come without an id get one here, the public entry point; the access log shows each.
    interceptor = MetricsInterceptor(metrics, [SERVICE_NAME], logging.INFO, make_request_ids=True)
    try:
        handle = await start_server(config.address, lambda s: add_to_server(servicer, s), [SERVICE_NAME],
                                    serving, LIMITED, [interceptor])
    except BaseException:
        batching.close()
        await pool.close()
        raise

    async def on_stop() -> None:
        batching.close()
        await asyncio.get_running_loop().run_in_executor(None, batching.join)
        await pool.close()
        dispatcher.close()

    handle.on_stop = on_stop
    coverage = CoverageHealth(pool, metrics, handle.set_serving)

    def on_change() -> None:
        servicer.info = info()
        coverage.update()

    pool.on_change = on_change
    on_change()
    return handle, servicer


async def _serve(config: GatewayConfig) -> None:
    keep_large_buffers()  # reuse tensor-sized message buffers instead of mmap-ing fresh ones per call
    set_torch_threads(config.torch_threads, parse_devices(config.dense_device))
    print(RULE)
    print("Starting gateway")
    print(RULE)
    start = time.monotonic()
    handle, servicer = await create_gateway(config, verbose=True)
    info = servicer.info
    where = config.host if config.host.startswith("unix:") else f"{config.host}:{handle.port}"
    print(summary("Gateway", [
        ("gRPC", f"{where} (GatewayService, grpc.health.v1, reflection)"),
        ("metrics", servicer.metrics.expose(config.metrics_host, config.metrics_port)),
        ("checkpoint", f"{config.checkpoint} ({info.model_type}, fingerprint {info.model_fingerprint})"),
        ("model", f"hidden {info.hidden_size}, MoE layers {list(info.moe_layers)} x {info.num_experts} experts, "
                  f"top-{info.top_k}, dense {config.dense_dtype} on {config.dense_device}, wire {config.wire_dtype}"),
        ("expert servers", ", ".join(f"{s.name or s.address} ({s.address})" for s in info.servers)),
        ("loaded in", f"{time.monotonic() - start:.1f} s"),
    ]))
    print(f"Gateway ready on {where}, serving {servicer.info.model_type} "
          f"with {len(servicer.info.servers)} expert server(s)", flush=True)
    await serve_until_signal(handle, config.grace_seconds)
    servicer.executor.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of moe-gateway."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        asyncio.run(_serve(config_from_args(args)))
    except (CheckpointError, PlacementError, StartupError, ValueError, OSError) as err:
        print(f"moe-gateway: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
