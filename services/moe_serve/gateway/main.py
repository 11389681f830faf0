"""`moe-gateway`: the router and dense layers, scattering tokens to expert servers over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field

import torch

from moe_client import wire
from moe_client.pb import gateway_pb2
from moe_serve.checkpoint import Checkpoint, CheckpointError
from moe_serve.gateway.dispatch import ExpertDispatcher, RemoteServer, StartupError, connect, ownership_table
from moe_serve.gateway.engine import GatewayEngine
from moe_serve.gateway.servicer import GatewayServicer, add_to_server
from moe_serve.grpc_server import ServerHandle, start_server
from moe_serve.malloc import keep_large_buffers
from moe_serve.models import load_dense_model
from moe_serve.placement import PlacementError, format_ownership, read_placement, resolve_ownership
from moe_serve.runtime import RULE, configure_logging, env, serve_until_signal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs, built from flags / MOE_* variables."""

    checkpoint: str
    servers: list[str] = field(default_factory=list)
    placement: str | None = None
    host: str = "0.0.0.0"
    port: int = 50050
    dense_dtype: str = "float32"
    wire_dtype: str = "float32"
    rpc_timeout: float = 60.0
    connect_timeout: float = 60.0
    max_tokens: int = 65536
    grace_seconds: float = 10.0
    log_level: str = "INFO"

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
                        "host (env MOE_SERVERS)")
    p.add_argument("--placement", default=env("PLACEMENT"),
                   help="placement file (JSON) naming servers, addresses and their experts (env MOE_PLACEMENT)")
    p.add_argument("--host", default=env("HOST", "0.0.0.0"),
                   help="address to bind, or unix:/path/to.sock (env MOE_HOST; default 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(env("PORT", "50050")),
                   help="port to bind; 0 picks one (env MOE_PORT; default 50050)")
    p.add_argument("--dense-dtype", default=env("DENSE_DTYPE", "float32"), choices=sorted(DTYPES),
                   help="dtype of the router and dense layers (env MOE_DENSE_DTYPE; default float32)")
    p.add_argument("--wire-dtype", default=env("WIRE_DTYPE", "float32"),
                   choices=["float32", "bfloat16", "float16", "float8_e4m3"],
                   help="dtype of hidden states sent to expert servers and of their replies; float8_e4m3 "
                        "carries a scale per token (env MOE_WIRE_DTYPE; default float32)")
    p.add_argument("--rpc-timeout", type=float, default=float(env("RPC_TIMEOUT", "60")),
                   help="deadline in seconds of each RunExperts call, like the seed's rpc_timeout "
                        "(env MOE_RPC_TIMEOUT; default 60)")
    p.add_argument("--connect-timeout", type=float, default=float(env("CONNECT_TIMEOUT", "60")),
                   help="seconds to wait at start for expert servers to answer (env MOE_CONNECT_TIMEOUT)")
    p.add_argument("--max-tokens", type=int, default=int(env("MAX_TOKENS", "65536")),
                   help="largest Forward batch in tokens; more is RESOURCE_EXHAUSTED (env MOE_MAX_TOKENS)")
    p.add_argument("--grace", type=float, default=float(env("GRACE", "10")),
                   help="seconds to finish in-flight requests on SIGTERM (env MOE_GRACE)")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="logging level (env MOE_LOG_LEVEL)")
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Flags -> config."""
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers and not args.placement:
        raise PlacementError("give the expert servers with --servers host:port,... or --placement FILE")
    return GatewayConfig(
        checkpoint=args.checkpoint, servers=servers, placement=args.placement, host=args.host, port=args.port,
        dense_dtype=args.dense_dtype, wire_dtype=args.wire_dtype, rpc_timeout=args.rpc_timeout,
        connect_timeout=args.connect_timeout, max_tokens=args.max_tokens, grace_seconds=args.grace,
        log_level=args.log_level,
    )


def _check_placement(checkpoint: Checkpoint, placement: str, servers: list[RemoteServer]) -> None:
    """Every expert the placement file gives a server must really be on that server."""
    for entry, server in zip(read_placement(placement), servers):
        expected = resolve_ownership(checkpoint.spec, entry.experts)
        owned = server.owned
        absent = [f"layer {layer}: {sorted(set(ids) - set(owned.get(layer, ())))}"
                  for layer, ids in expected.items() if set(ids) - set(owned.get(layer, ()))]
        if absent:
            raise StartupError(f"placement file {placement}: server {entry.name} ({entry.address}) does not hold "
                               + "; ".join(absent) + f"; it holds {'; '.join(format_ownership(owned))}")


def model_info(checkpoint: Checkpoint, fingerprint: str, servers: list[RemoteServer], dense_dtype: str):
    """The GetModelInfo answer."""
    spec = checkpoint.spec
    return gateway_pb2.ModelInfo(
        model_type=spec.model_type, model_fingerprint=fingerprint, hidden_size=spec.hidden_size,
        num_layers=spec.num_layers, moe_layers=list(spec.moe_layers), num_experts=spec.num_experts,
        top_k=spec.top_k, dense_dtype=dense_dtype,
        servers=[gateway_pb2.ExpertServerInfo(address=s.address, model_fingerprint=s.info.model_fingerprint,
                                              devices=list(s.info.devices), owned=format_ownership(s.owned))
                 for s in servers],
    )


def print_mapping(servers: list[RemoteServer], table: dict[int, torch.Tensor]) -> None:
    """The seed's 'Expert-to-worker mapping', per MoE layer."""
    for server in servers:
        print(f"  {server.name} at {server.address}: experts {'; '.join(format_ownership(server.owned))} "
              f"on {', '.join(server.info.devices)} ({server.info.compute_dtype})")
    for layer, owner in table.items():
        mapping = {e: servers[i].name for e, i in enumerate(owner.tolist())}
        print(f"Expert-to-server mapping, layer {layer}: {mapping}")


async def create_gateway(config: GatewayConfig, verbose: bool = False) -> tuple[ServerHandle, GatewayServicer]:
    """Connect to the expert servers, check they cover the model, and start serving."""
    checkpoint = Checkpoint(config.checkpoint)
    fingerprint = checkpoint.fingerprint()
    addresses = list(config.servers)
    if config.placement:
        addresses = addresses or [e.address for e in read_placement(config.placement)]
    if verbose:
        spec = checkpoint.spec
        print(f"Checkpoint: {checkpoint.path} ({spec.model_type}, fingerprint {fingerprint}, hidden "
              f"{spec.hidden_size}, MoE layers {list(spec.moe_layers)} x {spec.num_experts} experts, top-{spec.top_k})")
        print(f"Connecting to {len(addresses)} expert server(s): {', '.join(addresses)}", flush=True)
    servers = await connect(addresses, config.connect_timeout)
    try:
        if config.placement and not config.servers:
            _check_placement(checkpoint, config.placement, servers)
        table = ownership_table(checkpoint.spec, servers, fingerprint)
    except (StartupError, PlacementError):
        await asyncio.gather(*(s.channel.close() for s in servers))
        raise
    if verbose:
        print_mapping(servers, table)
    dispatcher = ExpertDispatcher(checkpoint.spec, servers, table, asyncio.get_running_loop(),
                                  wire.dtype_from_name(config.wire_dtype), config.rpc_timeout)
    engine = GatewayEngine(load_dense_model(checkpoint, DTYPES[config.dense_dtype]), dispatcher)
    servicer = GatewayServicer(engine, model_info(checkpoint, fingerprint, servers, config.dense_dtype),
                               config.max_tokens)
    handle = await start_server(config.address, lambda s: add_to_server(servicer, s), [SERVICE_NAME])
    handle.on_stop = lambda: asyncio.gather(*(s.channel.close() for s in servers))
    return handle, servicer


async def _serve(config: GatewayConfig) -> None:
    keep_large_buffers()  # reuse tensor-sized message buffers instead of mmap-ing fresh ones per call
    print(RULE)
    print("Starting gateway")
    print(RULE)
    handle, servicer = await create_gateway(config, verbose=True)
    where = config.host if config.host.startswith("unix:") else f"{config.host}:{handle.port}"
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
