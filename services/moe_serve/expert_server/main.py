"""`moe-expert-server`: serve some routed experts of a checkpoint over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from dataclasses import dataclass, field

import torch

from moe_client import wire
from moe_client.pb import experts_pb2
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.servicer import ExpertServicer, add_to_server, server_info
from moe_serve.model.checkpoint import Checkpoint, CheckpointError
from moe_serve.model.placement import PlacementError, format_ownership, pick_entry, read_placement, resolve_ownership
from moe_serve.observability.logs import configure_logging
from moe_serve.observability.metrics import MetricsInterceptor, ServiceMetrics, add_metrics_args
from moe_serve.process.console import RULE, LoadProgress, summary
from moe_serve.process.devices import describe_devices, parse_devices
from moe_serve.process.env import env
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.process.threads import GPU_HOST_THREADS, set_torch_threads
from moe_serve.rpc.options import ServingOptions, add_serving_args, serving_from_args
from moe_serve.rpc.server import ServerHandle, serve_until_signal, start_server

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SERVICE_NAME = experts_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
LIMITED = [f"/{SERVICE_NAME}/RunExperts"]  # counted against --max-queue


@dataclass(frozen=True)
class ExpertServerConfig:
    """Everything an expert server needs, built from flags / MOE_* variables."""

    checkpoint: str
    experts: str | list[str] | dict | None = None
    devices: str = "cpu"
    dtype: str = "float32"
    host: str = "0.0.0.0"
    port: int = 50051
    name: str = ""
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    cuda_graph_tokens: int = 16384
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0  # 0: no /metrics endpoint
    serving: ServingOptions = field(default_factory=lambda: ServingOptions(max_queue=256))
    merge_calls: bool = True
    torch_threads: int = 0  # 0: one per core on CPU devices, a few when every device is a GPU
    shared_memory: bool = True  # offer same-host callers the shared-memory / CUDA IPC fast path

    @property
    def address(self) -> str:
        return self.host if self.host.startswith("unix:") else f"{self.host}:{self.port}"


def build_parser() -> argparse.ArgumentParser:
    """Flags of moe-expert-server; each default can come from MOE_<FLAG>."""
    p = argparse.ArgumentParser(
        prog="moe-expert-server",
        description="Serve some routed experts of a MoE checkpoint over gRPC (ExpertService).",
    )
    p.add_argument("--checkpoint", default=env("CHECKPOINT"), required=env("CHECKPOINT") is None,
                   help="checkpoint directory: config.json + *.safetensors (env MOE_CHECKPOINT)")
    p.add_argument("--experts", action="append", default=None,
                   help="experts to own: '0-3,6' for every MoE layer, or LAYER:RANGES per layer, repeatable "
                        "(e.g. --experts 1:0-3 --experts 2:4-7); default all (env MOE_EXPERTS)")
    p.add_argument("--placement", default=env("PLACEMENT"),
                   help="placement file (JSON); with --name or --placement-index, take this server's experts "
                        "from it (env MOE_PLACEMENT)")
    p.add_argument("--name", default=env("NAME", ""),
                   help="this server's name, as in the placement file (env MOE_NAME; default: the placement "
                        "entry's name, else host:port)")
    p.add_argument("--placement-index", default=env("PLACEMENT_INDEX"),
                   help="take entry N (0-based) of the placement file; 'hostname' reads N from the host name's "
                        "trailing -N, as a Kubernetes StatefulSet pod's ordinal (env MOE_PLACEMENT_INDEX)")
    p.add_argument("--devices", default=env("DEVICES", "cpu"),
                   help="devices for the experts, round-robin: e.g. cuda:0,cuda:1,cpu; 'cuda' = all GPUs "
                        "(env MOE_DEVICES; default cpu)")
    p.add_argument("--dtype", default=env("DTYPE", "float32"), choices=sorted(DTYPES),
                   help="compute dtype of the experts (env MOE_DTYPE; default float32)")
    p.add_argument("--host", default=env("HOST", "0.0.0.0"),
                   help="address to bind, or unix:/path/to.sock (env MOE_HOST; default 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(env("PORT", "50051")),
                   help="port to bind; 0 picks a free one (env MOE_PORT; default 50051)")
    p.add_argument("--grace", type=float, default=float(env("GRACE", "10")),
                   help="seconds to finish in-flight requests on SIGTERM (env MOE_GRACE; default 10)")
    p.add_argument("--cuda-graph-tokens", type=int, default=int(env("CUDA_GRAPH_TOKENS", "16384")),
                   help="on GPUs in bf16, replay captured CUDA graphs for calls of up to this many tokens; "
                        "0 = launch kernels one by one (env MOE_CUDA_GRAPH_TOKENS; default 16384)")
    add_metrics_args(p)
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                   help="logging level: DEBUG logs every RPC with its request id (env MOE_LOG_LEVEL; default INFO)")
    p.add_argument("--merge-calls", action=argparse.BooleanOptionalAction,
                   default=env("MERGE_CALLS", "1").lower() in ("1", "true", "yes", "on"),
                   help="run RunExperts calls of one layer that queued up together (from several gateways or "
                        "micro-batches) as one computation (env MOE_MERGE_CALLS; default on)")
    p.add_argument("--torch-threads", type=int, default=int(env("TORCH_THREADS", "0")),
                   help="torch intra-op threads for the experts; 0 = one per core when experts run on the CPU, "
                        f"{GPU_HOST_THREADS} when every device is a GPU (host work is then copies and checks). With "
                        "several services on one host, give each its share of the cores (docs/benchmarks.md) "
                        "(env MOE_TORCH_THREADS)")
    p.add_argument("--shared-memory", action=argparse.BooleanOptionalAction,
                   default=env("SHARED_MEMORY", "1").lower() in ("1", "true", "yes", "on"),
                   help="let a gateway on this host leave tensors in shared memory (/dev/shm, or its GPU's memory "
                        "through CUDA IPC) instead of sending their bytes (env MOE_SHARED_MEMORY; default on)")
    add_serving_args(p, max_queue=256)
    return p


def config_from_args(args: argparse.Namespace) -> ExpertServerConfig:
    """Flags -> config; the expert selection comes from --experts, else the placement file, else all."""
    experts: str | list[str] | dict | None = args.experts or env("EXPERTS")
    name = args.name
    if args.placement:
        entry = pick_entry(args.placement, read_placement(args.placement), args.name, args.placement_index,
                           socket.gethostname())
        experts = experts or entry.experts
        name = name or entry.name
    return ExpertServerConfig(
        checkpoint=args.checkpoint, experts=experts, devices=args.devices, dtype=args.dtype, host=args.host,
        port=args.port, name=name, grace_seconds=args.grace, log_level=args.log_level,
        cuda_graph_tokens=args.cuda_graph_tokens, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
        serving=serving_from_args(args), merge_calls=args.merge_calls, torch_threads=args.torch_threads,
        shared_memory=args.shared_memory,
    )


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
        n_experts = len(set().union(*owned.values()))
        print(f"Distributing {n_experts} experts across {len(devices)} device(s) "
              f"({', '.join(str(d) for d in devices)}), dtype {config.dtype}")
    progress = LoadProgress(sum(len(ids) for ids in owned.values())) if verbose else None
    bank = ExpertBank.load(checkpoint, owned, devices, DTYPES[config.dtype], progress,
                           cuda_graph_tokens=config.cuda_graph_tokens)
    if verbose:
        by_expert: dict[int, str] = {}
        for placed in bank.placement():
            by_expert.setdefault(placed.expert, str(placed.device))
        for expert, device in sorted(by_expert.items()):
            print(f"  Expert {expert} → {device}")
        print(f"Owned experts: {'; '.join(format_ownership(bank.owned))}  ({bank.nbytes() / 2**20:.1f} MiB)")
    return bank, checkpoint


async def create_server(config: ExpertServerConfig, verbose: bool = False) -> tuple[ServerHandle, ExpertServicer]:
    """Load the bank and start serving on config.address; returns the running server."""
    bank, checkpoint = load_bank(config, verbose)
    fingerprint = checkpoint.fingerprint()
    metrics = ServiceMetrics("expert_server")
    servicer: ExpertServicer | None = None

    def register(server) -> None:
        nonlocal servicer
        servicer = ExpertServicer(bank, experts_pb2.GetInfoResponse(), metrics=metrics, merge=config.merge_calls)
        add_to_server(servicer, server)

    handle = await start_server(config.address, register, [SERVICE_NAME], config.serving, LIMITED,
                                [MetricsInterceptor(metrics, [SERVICE_NAME])])
    name = config.name or f"{socket.gethostname()}:{handle.port}"
    servicer.info = server_info(bank, fingerprint, checkpoint.spec, name, config.shared_memory)
    metrics.describe(name=name, model_fingerprint=fingerprint, model_type=checkpoint.spec.model_type,
                     dtype=config.dtype)
    metrics.init_experts(bank.owned)
    for device, nbytes in bank.nbytes_by_device().items():
        metrics.weight_bytes.labels(device).inc(nbytes)
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
