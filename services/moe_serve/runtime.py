"""Process plumbing shared by the service entry points: env-backed flags, logging, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

import torch

from moe_serve.request_ids import RequestIdFilter

if TYPE_CHECKING:  # grpc_server reads flags through this module's env()
    from moe_serve.grpc_server import ServerHandle

RULE = "=" * 80


def env(name: str, default: str | None = None) -> str | None:
    """Value of MOE_<NAME> from the environment (flags override it), else `default`."""
    return os.environ.get(f"MOE_{name.upper()}", default)


GPU_HOST_THREADS = 4  # torch threads of a service whose tensors all live on GPUs


def set_torch_threads(requested: int, devices: list[torch.device]) -> int:
    """Set torch's intra-op threads: `requested`, or (0) one per core when any compute is on the CPU, else
    GPU_HOST_THREADS. On a many-core host every parallel region of a host copy or check wakes all the
    threads (docs/gpu.md: the cost on a 64-core H100 host)."""
    if requested <= 0:
        cpu_compute = any(d.type == "cpu" for d in devices)
        requested = torch.get_num_threads() if cpu_compute else min(GPU_HOST_THREADS, os.cpu_count() or 1)
    torch.set_num_threads(requested)
    return requested


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    """--metrics-port / --metrics-host, the same on every service."""
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "0")),
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 = off (env MOE_METRICS_PORT; "
                        "default 0)")
    p.add_argument("--metrics-host", default=env("METRICS_HOST", "0.0.0.0"),
                   help="address the metrics endpoint binds (env MOE_METRICS_HOST; default 0.0.0.0)")


def configure_logging(level: str = "INFO") -> None:
    """Timestamped logs to stderr, each line with the id of the request it belongs to ('-' for none)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    for noisy in ("asyncio", "grpc._cython"):  # at DEBUG they log every call's event loop, drowning ours
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


async def serve_until_signal(handle: ServerHandle, grace: float) -> None:
    """Run until SIGTERM or SIGINT; then NOT_SERVING, finish in-flight calls within `grace`, and return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"Shutting down (finishing in-flight requests, up to {grace:.0f}s)...", flush=True)
    await handle.stop(grace)
    print("Stopped.", flush=True)
