"""An expert server's configuration: one frozen ExpertServerConfig, built from moe-expert-server's flags and
MOE_* variables."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_serve.model.placement import pick_entry, read_placement
from moe_serve.observability.metrics import add_metrics_args
from moe_serve.process.env import env, env_flag
from moe_serve.process.threads import GPU_HOST_THREADS
from moe_serve.rpc.options import ServingOptions, add_serving_args, serving_from_args

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
    tcp_channel_port: int = 0  # TCP port of the side channel for other hosts' callers; 0 picks one, -1 none
    admin_token: str | None = None  # AdminService callers send it as a bearer token (or use mutual TLS)
    expert_capacity: str = ""  # 'cpu=8GiB,cuda:0=70GiB': bytes of experts per device (default: its memory)
    max_tokens: int = 65536  # tokens of the largest RunExperts call: sets the message size limit

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
    p.add_argument("--host", default=env("HOST"),
                   help="address to bind, or unix:/path/to.sock (env MOE_HOST; default: the placement entry's "
                        "host when it is an IP address or unix: path, else 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(env("PORT")) if env("PORT") else None,
                   help="port to bind; 0 picks a free one (env MOE_PORT; default: the placement entry's port, "
                        "else 50051)")
    p.add_argument("--grace", type=float, default=float(env("GRACE", "10")),
                   help="seconds to finish in-flight requests on SIGTERM (env MOE_GRACE; default 10)")
    p.add_argument("--cuda-graph-tokens", type=int, default=int(env("CUDA_GRAPH_TOKENS", "16384")),
                   help="on GPUs in bf16, replay captured CUDA graphs for calls of up to this many tokens; "
                        "0 = launch kernels one by one (env MOE_CUDA_GRAPH_TOKENS; default 16384)")
    add_metrics_args(p)
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                   help="logging level: DEBUG logs every RPC with its request id (env MOE_LOG_LEVEL; default INFO)")
    p.add_argument("--merge-calls", action=argparse.BooleanOptionalAction,
                   default=env_flag("MERGE_CALLS", True),
                   help="run RunExperts calls of one layer that queued up together (from several gateways or "
                        "micro-batches) as one computation (env MOE_MERGE_CALLS; default on)")
    p.add_argument("--torch-threads", type=int, default=int(env("TORCH_THREADS", "0")),
                   help="torch intra-op threads for the experts; 0 = one per core when experts run on the CPU, "
                        f"{GPU_HOST_THREADS} when every device is a GPU (host work is then copies and checks). With "
                        "several services on one host, give each its share of the cores (docs/benchmarks.md) "
                        "(env MOE_TORCH_THREADS)")
    p.add_argument("--shared-memory", action=argparse.BooleanOptionalAction,
                   default=env_flag("SHARED_MEMORY", True),
                   help="let a gateway on this host leave tensors in shared memory (/dev/shm, or its GPU's memory "
                        "through CUDA IPC) instead of sending their bytes (env MOE_SHARED_MEMORY; default on)")
    p.add_argument("--tcp-channel-port", type=int, default=int(env("TCP_CHANNEL_PORT", "0")),
                   help="TCP port of the side channel: gateways on other hosts send RunExperts there as frames "
                        "with the tensors' bytes, without gRPC's copies (GetInfo announces it, on the host of "
                        "--host); 0 picks a free port, -1 offers none. Not offered with TLS (the side channel is "
                        "not encrypted): then every call is gRPC (env MOE_TCP_CHANNEL_PORT; default 0)")
    p.add_argument("--admin-token-file", default=env("ADMIN_TOKEN_FILE"),
                   help="AdminService (live expert loads and drops, per-expert load) takes calls with "
                        "'authorization: Bearer TOKEN', TOKEN read from this file; without it only callers with "
                        "a verified client certificate (mutual TLS), and without that nobody (env "
                        "MOE_ADMIN_TOKEN_FILE)")
    p.add_argument("--expert-capacity", default=env("EXPERT_CAPACITY", ""),
                   help="bytes of experts each device may hold, for live loads and `moe-serve plan`: e.g. "
                        "cpu=8GiB,cuda:0=70GiB; devices not named: their physical memory (env MOE_EXPERT_CAPACITY)")
    p.add_argument("--max-tokens", type=int, default=int(env("MAX_TOKENS", "65536")),
                   help="tokens of the largest RunExperts call (the gateway's --max-tokens): with the hidden size it "
                        "sets --max-message-bytes' default (env MOE_MAX_TOKENS; default 65536)")
    add_serving_args(p, max_queue=256)
    return p


def bind_address(address: str) -> tuple[str | None, int | None]:
    """Where to listen for a placement entry's address: its host if an IP address (a name may not be this
    host's to bind: then all interfaces), a unix: path as it is, and its port."""
    if address.startswith("unix:"):
        return address, None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = None
    return host, int(port) if port.isdigit() else None


def config_from_args(args: argparse.Namespace) -> ExpertServerConfig:
    """Flags -> config; the expert selection comes from --experts, else the placement file, else all."""
    experts: str | list[str] | dict | None = args.experts or env("EXPERTS")
    name = args.name
    host, port = args.host, args.port
    if args.placement:
        entry = pick_entry(args.placement, read_placement(args.placement), args.name, args.placement_index,
                           socket.gethostname())
        experts = experts or entry.experts
        name = name or entry.name
        entry_host, entry_port = bind_address(entry.address)
        host = host or entry_host
        port = entry_port if port is None else port
    return ExpertServerConfig(
        checkpoint=args.checkpoint, experts=experts, devices=args.devices, dtype=args.dtype, host=host or "0.0.0.0",
        port=50051 if port is None else port, name=name, grace_seconds=args.grace, log_level=args.log_level,
        cuda_graph_tokens=args.cuda_graph_tokens, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
        serving=serving_from_args(args), merge_calls=args.merge_calls, torch_threads=args.torch_threads,
        shared_memory=args.shared_memory, tcp_channel_port=args.tcp_channel_port,
        admin_token=_read_token(args.admin_token_file),
        expert_capacity=args.expert_capacity, max_tokens=args.max_tokens,
    )


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise ValueError(f"--admin-token-file {path}: {err.strerror or err}") from err
    if not token:
        raise ValueError(f"--admin-token-file {path} is empty")
    return token
