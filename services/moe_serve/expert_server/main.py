"""`moe-expert-server`: serve some routed experts of a checkpoint over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from dataclasses import dataclass

import torch

from moe_client.pb import experts_pb2
from moe_serve.checkpoint import Checkpoint, CheckpointError
from moe_serve.devices import describe_devices, parse_devices
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.servicer import ExpertServicer, add_to_server, server_info
from moe_serve.grpc_server import ServerHandle, start_server
from moe_serve.malloc import keep_large_buffers
from moe_serve.placement import PlacementError, format_ownership, read_placement, resolve_ownership
from moe_serve.runtime import RULE, configure_logging, env, serve_until_signal

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SERVICE_NAME = experts_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


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
    torch_threads: int = 0  # 0: torch's default, one per core

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
                   help="placement file (JSON); with --name, take this server's experts from it (env MOE_PLACEMENT)")
    p.add_argument("--name", default=env("NAME", ""),
                   help="this server's name, as in the placement file (env MOE_NAME; default host:port)")
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
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="logging level (env MOE_LOG_LEVEL)")
    p.add_argument("--torch-threads", type=int, default=int(env("TORCH_THREADS", "0")),
                   help="torch intra-op threads for the experts; 0 = one per core. With several services on one "
                        "host, give each its share of the cores (docs/benchmarks.md) (env MOE_TORCH_THREADS)")
    return p


def config_from_args(args: argparse.Namespace) -> ExpertServerConfig:
    """Flags -> config; the expert selection comes from --experts, else the placement file, else all."""
    experts: str | list[str] | dict | None = args.experts or env("EXPERTS")
    if args.placement:
        if not args.name:
            raise PlacementError("--placement needs --name to pick this server's entry")
        entries = {e.name: e for e in read_placement(args.placement)}
        if args.name not in entries:
            raise PlacementError(f"placement file {args.placement} has no server named {args.name!r}; "
                                 f"it names {sorted(entries)}")
        experts = experts or entries[args.name].experts
    return ExpertServerConfig(
        checkpoint=args.checkpoint, experts=experts, devices=args.devices, dtype=args.dtype, host=args.host,
        port=args.port, name=args.name, grace_seconds=args.grace, log_level=args.log_level,
        torch_threads=args.torch_threads,
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
    bank = ExpertBank.load(checkpoint, owned, devices, DTYPES[config.dtype])
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
    servicer: ExpertServicer | None = None

    def register(server) -> None:
        nonlocal servicer
        servicer = ExpertServicer(bank, experts_pb2.ServerInfo())
        add_to_server(servicer, server)

    handle = await start_server(config.address, register, [SERVICE_NAME])
    name = config.name or f"{socket.gethostname()}:{handle.port}"
    servicer.info = server_info(bank, fingerprint, checkpoint.spec, name)
    return handle, servicer


async def _serve(config: ExpertServerConfig) -> None:
    keep_large_buffers()  # reuse tensor-sized message buffers instead of mmap-ing fresh ones per call
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)  # before any compute thread starts
    print(RULE)
    print(f"Starting expert server {config.name or config.address}")
    print(RULE)
    handle, servicer = await create_server(config, verbose=True)
    where = config.host if config.host.startswith("unix:") else f"{config.host}:{handle.port}"
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
