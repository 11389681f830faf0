"""The gateway's configuration: one frozen GatewayConfig, built from moe-gateway's flags and MOE_* variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from moe_client.security import TLSFiles
from moe_serve.gateway.batching_config import (
    BatchingConfig,
    add_batching_flags,
    batching_config_from_args,
)
from moe_serve.model.placement import PlacementError
from moe_serve.observability.metrics import add_metrics_args
from moe_serve.process.env import env, env_flag
from moe_serve.process.threads import GPU_HOST_THREADS
from moe_serve.rpc.options import ServingOptions, add_serving_args, serving_from_args

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WIRE_DTYPES = ["float32", "bfloat16", "float16", "float8_e4m3"]
# Well above what the batcher holds by default (a Forward batch of up to 4096 one-token requests and 1024
# waiting; 128 running and 1024 waiting Generate streams), whose own limits refuse first; without batching
# (--no-batching) this is what bounds the worker pool's queue.
GATEWAY_MAX_QUEUE = 8192


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs, built from flags / MOE_* variables."""

    checkpoint: str
    servers: list[str] = field(default_factory=list)
    placement: str | None = None
    host: str = "0.0.0.0"
    port: int = 50050
    dense_dtype: str = "float32"
    dense_device: str = "cpu"
    wire_dtype: str = "float32"
    reply_wire_dtype: str = ""  # "": as wire_dtype
    full_precision_below_tokens: int = 0  # calls of fewer tokens go in float32 both ways
    rpc_timeout: float = 60.0
    connect_timeout: float = 60.0
    max_tokens: int = 65536
    max_new_tokens: int = 4096
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0  # 0: no /metrics endpoint
    resolve_interval: float = 10.0
    keepalive: float = 10.0
    tcp_lanes: int = 4  # connections per expert server; a large RunExperts is split by rows over them
    min_piece_bytes: int = 1 << 20  # smallest piece (hidden-state bytes) a split call is cut into
    pieces_per_lane: int = 1  # over TCP side links: a large call's pieces per connection, sent in order
    expert_tls: TLSFiles | None = None
    serving: ServingOptions = field(default_factory=lambda: ServingOptions(max_queue=GATEWAY_MAX_QUEUE))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    shared_memory: bool = True  # same-host expert servers get tensors through shared memory / CUDA IPC
    same_host_calls: bool = True  # ... and their RunExperts calls over a Unix socket instead of gRPC
    routed_calls: bool = True  # ... and, with dense layers on a GPU, the routing left there (no host wait per call)
    pipelined_calls: bool = True  # ... and such calls not waited for where no failover is possible (GPU waits)
    tcp_calls: bool = True  # other hosts' servers get RunExperts over their TCP side channel instead of gRPC
    torch_threads: int = 0  # 0: one per core with dense layers on the CPU, a few with them on a GPU

    @property
    def address(self) -> str:
        return self.host if self.host.startswith("unix:") else f"{self.host}:{self.port}"


def build_parser() -> argparse.ArgumentParser:
    """Flags of moe-gateway; each default can come from MOE_<FLAG>."""
    p = argparse.ArgumentParser(prog="moe-gateway",
                                description="Serve a MoE model over gRPC, with routed experts on expert servers.")
    p.add_argument("--checkpoint", default=env("CHECKPOINT"), required=env("CHECKPOINT") is None,
                   help="checkpoint directory, the same the expert servers load (env MOE_CHECKPOINT)")
    p.add_argument("--servers", default=env("SERVERS", ""),
                   help="comma-separated expert server addresses host:port, or unix:/path for a server on this "
                        "host; a DNS name may resolve to several servers (a Kubernetes headless service) and is "
                        "re-resolved (env MOE_SERVERS)")
    p.add_argument("--placement", default=env("PLACEMENT"),
                   help="placement file (JSON) naming servers, addresses and their experts (env MOE_PLACEMENT)")
    p.add_argument("--host", default=env("HOST", "0.0.0.0"),
                   help="address to bind, or unix:/path/to.sock (env MOE_HOST; default 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(env("PORT", "50050")),
                   help="port to bind; 0 picks one (env MOE_PORT; default 50050)")
    p.add_argument("--dense-device", default=env("DENSE_DEVICE", "cpu"),
                   help="device of the router and dense layers, e.g. cuda:0 (env MOE_DENSE_DEVICE; default cpu)")
    p.add_argument("--dense-dtype", default=env("DENSE_DTYPE", "float32"), choices=sorted(DTYPES),
                   help="dtype of the router and dense layers (env MOE_DENSE_DTYPE; default float32)")
    p.add_argument("--wire-dtype", default=env("WIRE_DTYPE", "float32"), choices=WIRE_DTYPES,
                   help="dtype of hidden states sent to expert servers and of their replies; float8_e4m3 "
                        "carries a scale per token (env MOE_WIRE_DTYPE; default float32)")
    p.add_argument("--reply-wire-dtype", default=env("REPLY_WIRE_DTYPE", ""), choices=["", *WIRE_DTYPES],
                   help="wire dtype of the experts' partial sums coming back (default: as --wire-dtype); e.g. "
                        "--wire-dtype float8_e4m3 --reply-wire-dtype bfloat16 (env MOE_REPLY_WIRE_DTYPE)")
    p.add_argument("--full-precision-below-tokens", type=int, default=int(env("FULL_PRECISION_BELOW_TOKENS", "0")),
                   help="expert calls of fewer tokens travel in float32 both ways: small calls are bound by the "
                        "round trip, not the bytes (env MOE_FULL_PRECISION_BELOW_TOKENS; default 0, off)")
    p.add_argument("--rpc-timeout", type=float, default=float(env("RPC_TIMEOUT", "60")),
                   help="deadline in seconds of each RunExperts call, like the seed's rpc_timeout; a call past it "
                        "goes to another replica within the caller's deadline (env MOE_RPC_TIMEOUT; default 60)")
    p.add_argument("--resolve-interval", type=float, default=float(env("RESOLVE_INTERVAL", "10")),
                   help="seconds between re-resolutions of --servers: new servers join, vanished ones leave "
                        "(env MOE_RESOLVE_INTERVAL; default 10)")
    p.add_argument("--keepalive", type=float, default=float(env("KEEPALIVE", "10")),
                   help="ping expert servers this often (seconds); one silent as long again is down "
                        "(env MOE_KEEPALIVE; default 10)")
    p.add_argument("--tcp-lanes", type=int, default=int(env("TCP_LANES", "4")),
                   help="connections to each expert server; a call carrying twice --tcp-min-piece-bytes of hidden "
                        "states or more (2 MiB) is split by tokens over them (env MOE_TCP_LANES; default 4)")
    p.add_argument("--tcp-min-piece-bytes", type=int, default=int(env("TCP_MIN_PIECE_BYTES", str(1 << 20))),
                   help="smallest piece of hidden states (bytes) a call is split into over --tcp-lanes: a call of "
                        "twice this or more is split. Smaller pieces overlap one piece's reply with the next one's "
                        "request on a link with real latency; on loopback they only add work (env "
                        "MOE_TCP_MIN_PIECE_BYTES; default 1048576; docs/deployment-sizing.md)")
    p.add_argument("--tcp-pieces-per-lane", type=int, default=int(env("TCP_PIECES_PER_LANE", "1")),
                   help="over the TCP side channel, a large call's pieces per connection (still at least "
                        "--tcp-min-piece-bytes each), each connection's sent in order: the server answers one "
                        "piece while the next one arrives, so replies and requests share a full-duplex link's "
                        "time. Pays where the link, not the hosts' CPUs, is the bound (env "
                        "MOE_TCP_PIECES_PER_LANE; default 1; docs/deployment-sizing.md)")
    p.add_argument("--expert-tls-ca", default=env("EXPERT_TLS_CA"),
                   help="CA certificate (PEM) of the expert servers; turns TLS on toward them (env MOE_EXPERT_TLS_CA)")
    p.add_argument("--expert-tls-cert", default=env("EXPERT_TLS_CERT"),
                   help="this gateway's client certificate (PEM) for expert servers that require one "
                        "(env MOE_EXPERT_TLS_CERT)")
    p.add_argument("--expert-tls-key", default=env("EXPERT_TLS_KEY"),
                   help="private key (PEM) of --expert-tls-cert (env MOE_EXPERT_TLS_KEY)")
    p.add_argument("--connect-timeout", type=float, default=float(env("CONNECT_TIMEOUT", "60")),
                   help="seconds to wait at start for expert servers to answer (env MOE_CONNECT_TIMEOUT; "
                        "default 60)")
    p.add_argument("--max-tokens", type=int, default=int(env("MAX_TOKENS", "65536")),
                   help="largest Forward batch in tokens; more is RESOURCE_EXHAUSTED (env MOE_MAX_TOKENS; "
                        "default 65536)")
    p.add_argument("--max-new-tokens", type=int, default=int(env("MAX_NEW_TOKENS", "4096")),
                   help="largest max_new_tokens a Generate may ask for (env MOE_MAX_NEW_TOKENS; default 4096)")
    p.add_argument("--grace", type=float, default=float(env("GRACE", "10")),
                   help="seconds to finish in-flight requests on SIGTERM (env MOE_GRACE; default 10)")
    add_metrics_args(p)
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                   help="logging level: INFO logs every request with its id and status (env MOE_LOG_LEVEL; "
                        "default INFO)")
    p.add_argument("--shared-memory", action=argparse.BooleanOptionalAction,
                   default=env_flag("SHARED_MEMORY", True),
                   help="with expert servers on this host that accept it, leave hidden states in shared memory "
                        "(/dev/shm, or the dense GPU's memory through CUDA IPC) instead of sending their bytes "
                        "(env MOE_SHARED_MEMORY; default on)")
    p.add_argument("--same-host-calls", action=argparse.BooleanOptionalAction,
                   default=env_flag("SAME_HOST_CALLS", True),
                   help="with --shared-memory, call expert servers on this host that offer it over a Unix socket "
                        "from the model thread instead of gRPC (~0.05 ms a call instead of ~0.5; gRPC stays the "
                        "fallback) (env MOE_SAME_HOST_CALLS; default on)")
    p.add_argument("--routed-calls", action=argparse.BooleanOptionalAction,
                   default=env_flag("ROUTED_CALLS", True),
                   help="with dense layers on a GPU and same-host calls, leave each MoE layer's routing on that GPU "
                        "and let neither side wait for it (CUDA IPC events; no NaN/Inf check of the tensors by the "
                        "servers) instead of bringing it to the host at every layer (env MOE_ROUTED_CALLS; "
                        "default on)")
    p.add_argument("--pipelined-calls", action=argparse.BooleanOptionalAction,
                   default=env_flag("PIPELINED_CALLS", True),
                   help="with routed calls, do not wait for the replies of a layer whose experts have one replica "
                        "each: the GPU waits for a word the server sets when done (CUDA stream memory operations), "
                        "and the replies are read a few layers later; a failed call then fails the forward, as it "
                        "would with no replica to fail over to (env MOE_PIPELINED_CALLS; default on)")
    p.add_argument("--tcp-calls", action=argparse.BooleanOptionalAction, default=env_flag("TCP_CALLS", True),
                   help="call expert servers on other hosts (or without shared memory) that offer it over their TCP "
                        "side channel from the model thread, the tensors' bytes sent from their own buffers, instead "
                        "of gRPC (whose Python stack copies large messages several times; gRPC stays the fallback; "
                        "not with --expert-tls) (env MOE_TCP_CALLS; default on)")
    p.add_argument("--torch-threads", type=int, default=int(env("TORCH_THREADS", "0")),
                   help=f"torch intra-op threads; 0 = one per core with --dense-device cpu, {GPU_HOST_THREADS} with "
                        "a GPU (env MOE_TORCH_THREADS)")
    add_serving_args(p, max_queue=GATEWAY_MAX_QUEUE, token=True)
    add_batching_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Flags -> config."""
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers and not args.placement:
        raise PlacementError("give the expert servers with --servers host:port,... or --placement FILE")
    return GatewayConfig(
        checkpoint=args.checkpoint, servers=servers, placement=args.placement, host=args.host, port=args.port,
        dense_dtype=args.dense_dtype, dense_device=args.dense_device, wire_dtype=args.wire_dtype,
        reply_wire_dtype=args.reply_wire_dtype, full_precision_below_tokens=args.full_precision_below_tokens,
        rpc_timeout=args.rpc_timeout, connect_timeout=args.connect_timeout, max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens, grace_seconds=args.grace, log_level=args.log_level,
        metrics_host=args.metrics_host, metrics_port=args.metrics_port, resolve_interval=args.resolve_interval,
        keepalive=args.keepalive, tcp_lanes=args.tcp_lanes, min_piece_bytes=args.tcp_min_piece_bytes,
        pieces_per_lane=args.tcp_pieces_per_lane,
        expert_tls=TLSFiles.of(args.expert_tls_ca, args.expert_tls_cert, args.expert_tls_key),
        serving=serving_from_args(args), batching=batching_config_from_args(args),
        shared_memory=args.shared_memory, same_host_calls=args.same_host_calls, torch_threads=args.torch_threads,
        tcp_calls=args.tcp_calls, routed_calls=args.routed_calls, pipelined_calls=args.pipelined_calls,
    )
