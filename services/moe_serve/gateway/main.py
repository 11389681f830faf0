"""`moe-gateway`: the router and dense layers, scattering tokens to expert servers over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field

import torch

from moe_client import wire
from moe_client.ownership import to_messages
from moe_client.pb import gateway_pb2
from moe_client.security import TLSFiles
from moe_serve.gateway.batching_config import (
    BatchingConfig,
    add_batching_flags,
    batching_config_from_args,
    start_batching,
)
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.engine import GatewayEngine
from moe_serve.gateway.pool import PoolOptions, Replica, ServerPool, StartupError
from moe_serve.gateway.servicer import GatewayServicer, add_to_server
from moe_serve.model.checkpoint import Checkpoint, CheckpointError
from moe_serve.model.loader import load_dense_model
from moe_serve.model.placement import PlacementError, format_ownership, read_placement, resolve_ownership
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.observability.logs import configure_logging
from moe_serve.observability.metrics import MetricsInterceptor, ServiceMetrics, add_metrics_args
from moe_serve.process.console import RULE, summary
from moe_serve.process.devices import parse_devices
from moe_serve.process.env import env
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.process.threads import GPU_HOST_THREADS, set_torch_threads
from moe_serve.rpc.options import ServingOptions, add_serving_args, serving_from_args
from moe_serve.rpc.server import ServerHandle, serve_until_signal, start_server
from moe_serve.rpc.shared_regions import ArenaPool, kind_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
LIMITED = [f"/{SERVICE_NAME}/Forward", f"/{SERVICE_NAME}/Generate"]  # counted against --max-queue
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
    expert_tls: TLSFiles | None = None
    serving: ServingOptions = field(default_factory=lambda: ServingOptions(max_queue=GATEWAY_MAX_QUEUE))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    shared_memory: bool = True  # same-host expert servers get tensors through shared memory / CUDA IPC
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
    p.add_argument("--wire-dtype", default=env("WIRE_DTYPE", "float32"),
                   choices=["float32", "bfloat16", "float16", "float8_e4m3"],
                   help="dtype of hidden states sent to expert servers and of their replies; float8_e4m3 "
                        "carries a scale per token (env MOE_WIRE_DTYPE; default float32)")
    p.add_argument("--rpc-timeout", type=float, default=float(env("RPC_TIMEOUT", "60")),
                   help="deadline in seconds of each RunExperts call, like the seed's rpc_timeout; a call past it "
                        "goes to another replica within the caller's deadline (env MOE_RPC_TIMEOUT; default 60)")
    p.add_argument("--resolve-interval", type=float, default=float(env("RESOLVE_INTERVAL", "10")),
                   help="seconds between re-resolutions of --servers: new servers join, vanished ones leave "
                        "(env MOE_RESOLVE_INTERVAL; default 10)")
    p.add_argument("--keepalive", type=float, default=float(env("KEEPALIVE", "10")),
                   help="ping expert servers this often (seconds); one silent as long again is down "
                        "(env MOE_KEEPALIVE; default 10)")
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
                   default=env("SHARED_MEMORY", "1").lower() in ("1", "true", "yes", "on"),
                   help="with expert servers on this host that accept it, leave hidden states in shared memory "
                        "(/dev/shm, or the dense GPU's memory through CUDA IPC) instead of sending their bytes "
                        "(env MOE_SHARED_MEMORY; default on)")
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
        rpc_timeout=args.rpc_timeout, connect_timeout=args.connect_timeout, max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens, grace_seconds=args.grace, log_level=args.log_level,
        metrics_host=args.metrics_host, metrics_port=args.metrics_port, resolve_interval=args.resolve_interval,
        keepalive=args.keepalive, expert_tls=TLSFiles.of(args.expert_tls_ca, args.expert_tls_cert, args.expert_tls_key),
        serving=serving_from_args(args), batching=batching_config_from_args(args),
        shared_memory=args.shared_memory, torch_threads=args.torch_threads,
    )


def _check_placement(checkpoint: Checkpoint, placement: str, servers: list[Replica]) -> None:
    """Every expert the placement file gives a server must really be on that server (each address of it)."""
    for entry in read_placement(placement):
        expected = resolve_ownership(checkpoint.spec, entry.experts)
        for server in (s for s in servers if s.target == entry.address):
            owned = server.owned
            absent = [f"layer {layer}: {sorted(set(ids) - set(owned.get(layer, ())))}"
                      for layer, ids in expected.items() if set(ids) - set(owned.get(layer, ()))]
            if absent:
                raise StartupError(f"placement file {placement}: server {entry.name} ({server.address}) does not "
                                   f"hold " + "; ".join(absent) + f"; it holds {'; '.join(format_ownership(owned))}")


def model_info(checkpoint: Checkpoint, fingerprint: str, servers: list[Replica], dense_dtype: str,
               has_tokenizer: bool = False):
    """The GetModelInfo answer; `servers` are the ones serving now."""
    spec = checkpoint.spec
    return gateway_pb2.GetModelInfoResponse(
        model_type=spec.model_type, model_fingerprint=fingerprint, hidden_size=spec.hidden_size,
        num_layers=spec.num_layers, moe_layers=list(spec.moe_layers), num_experts=spec.num_experts,
        top_k=spec.top_k, dense_dtype=wire.dtype_from_name(dense_dtype),
        servers=[gateway_pb2.ExpertServerInfo(address=s.address, model_fingerprint=s.info.model_fingerprint,
                                              devices=list(s.info.devices), owned=to_messages(s.owned),
                                              name=s.info.server_name)
                 for s in servers],
        vocab_size=spec.vocab_size, max_position_embeddings=spec.max_position_embeddings if spec.has_attention else 0,
        has_tokenizer=has_tokenizer, eos_token_ids=list(spec.eos_token_ids),
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


async def create_gateway(config: GatewayConfig, verbose: bool = False) -> tuple[ServerHandle, GatewayServicer]:
    """Connect to the expert servers, check they cover the model, and start serving."""
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
    pool = ServerPool(addresses, checkpoint.spec, fingerprint,
                      PoolOptions(rpc_timeout=config.rpc_timeout, resolve_interval=config.resolve_interval,
                                  keepalive=config.keepalive, tls=config.expert_tls,
                                  max_message_bytes=config.serving.max_message_bytes))
    await pool.start(config.connect_timeout)
    try:
        if config.placement and not config.servers:
            _check_placement(checkpoint, config.placement, pool.members)
    except (StartupError, PlacementError):
        await pool.close()
        raise
    if verbose:
        print_mapping(pool, config.shared_memory)
    metrics = ServiceMetrics("gateway")
    metrics.describe(model_fingerprint=fingerprint, model_type=checkpoint.spec.model_type, dtype=config.dense_dtype)
    dispatcher = ExpertDispatcher(checkpoint.spec, pool, asyncio.get_running_loop(),
                                  wire.dtype_from_name(config.wire_dtype), config.rpc_timeout, metrics,
                                  ArenaPool() if config.shared_memory else None)
    engine = GatewayEngine(model, dispatcher, tokenizer)

    def info() -> gateway_pb2.GetModelInfoResponse:  # GetModelInfo lists the servers serving now
        return model_info(checkpoint, fingerprint, pool.live(), config.dense_dtype, tokenizer is not None)

    batching = start_batching(config.batching, model, dispatcher, tokenizer)
    servicer = GatewayServicer(engine, info(), config.max_tokens, max_new_tokens=config.max_new_tokens,
                               metrics=metrics, batcher=batching.batcher, scheduler=batching.scheduler)
    pool.on_change = lambda: setattr(servicer, "info", info())
    # Requests that come without an id get one here, the public entry point; the access log shows each.
    interceptor = MetricsInterceptor(metrics, [SERVICE_NAME], logging.INFO, make_request_ids=True)
    try:
        handle = await start_server(config.address, lambda s: add_to_server(servicer, s), [SERVICE_NAME],
                                    config.serving, LIMITED, [interceptor])
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
        ("expert servers", ", ".join(s.address for s in info.servers)),
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
