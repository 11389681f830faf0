"""Where the CPU goes in one benchmark scenario, across every process it uses (Linux `perf`).

    python -m benchmarks.profile transport --tokens 1024     # 8 MiB RunExperts-sized echo
    python -m benchmarks.profile transport --tokens 1 --dtype bfloat16   # 4 KiB
    python -m benchmarks.profile transport --tokens 1024 --tcp   # over TCP: the lanes vs torch RPC tcp-only
    python -m benchmarks.profile moe --tokens 512             # one MoE layer, 2 expert servers

Runs the scenario in a loop for ours (gRPC) and for torch RPC in turn, samples the processes with
`perf record`, and prints CPU milliseconds per call by category (copies in user space, copies in
the kernel's socket code, page zeroing, the Python interpreter, gRPC's core, torch's compute, ...).
Needs perf and permission to use it (root, or kernel.perf_event_paranoid <= 0).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # before torch loads: quiet TensorPipe teardown
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # and grpc's INFO line per closed connection

import argparse
import collections
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed.rpc as rpc

from benchmarks import rpc_worker, transport
from benchmarks.model import Shape, ensure_checkpoint, make_input, moe_layer, owner_table
from benchmarks.procs import EchoPhase, GrpcPhase, RpcPhase, bench_loop
from benchmarks.rpc_design import RpcSeedDesign
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.process.malloc import keep_large_buffers
from tests.support import ROOT

# (category, pattern on "dso symbol"), first match wins.
CATEGORIES = [
    ("page zeroing and faults", r"clear_page|do_anonymous_page|handle_mm_fault|page_fault|get_page_from_freelist"),
    ("kernel copies (socket, CMA)", r"copy_user|_copy_to_iter|_copy_from_iter|copy_page_to_iter|skb_copy"),
    ("CMA page pinning", r"follow_page_pte|get_user_pages|unpin_user_pages|pin_user_pages"),
    ("context switches, yields", r"finish_task_switch|__schedule|sched_yield|_raw_spin_unlock_irqrestore|"
                                 r"try_to_wake_up|futex"),
    ("user-space copies (memcpy)", r"memmove|memcpy"),
    ("OpenMP (incl. spin-wait)", r"libgomp|libiomp"),
    ("torch compute", r"libtorch|mkl|dnnl|oneDNN|libc10|libshm"),
    ("gRPC core", r"cygrpc|libgrpc"),
    ("Python interpreter", r"python3|libpython"),
    ("other kernel", r"\[kernel"),
]


def top_symbols(perf_data: Path, n: int = 12) -> list[str]:
    """The `n` hottest symbols, for the categories' sake."""
    out = subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children", "--sort", "dso,sym", "--stdio"],
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip() and not line.startswith("#")][:n]


def categorise(perf_data: Path) -> dict[str, int]:
    """Samples per category from a perf.data file."""
    out = subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children", "--sort", "dso,sym",
                          "--stdio", "-F", "sample,dso,sym"], capture_output=True, text=True, check=True).stdout
    counts: collections.Counter = collections.Counter()
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        name = next((c for c, pattern in CATEGORIES if re.search(pattern, parts[1])), "other")
        counts[name] += int(parts[0])
    return dict(counts)


def profile(fn, pids: list[int], seconds: float, frequency: int = 999) -> tuple[dict[str, float], float]:
    """Run `fn` in a loop while perf samples `pids`; CPU ms per call by category, and calls per second."""
    calls = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal calls
        while not stop.is_set():
            fn()
            calls += 1

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(1.0)  # past warm-up
        start_calls, start = calls, time.perf_counter()
        subprocess.run(["perf", "record", "-q", "-F", str(frequency), "-o", str(data), "-p",
                        ",".join(map(str, pids)), "--", "sleep", str(seconds)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        n, elapsed = calls - start_calls, time.perf_counter() - start
        stop.set()
        thread.join()
        counts = categorise(data)
        if os.environ.get("MOE_PROFILE_SYMBOLS"):
            print("\n".join(top_symbols(data)))
    per_call = {k: v / frequency * 1e3 / max(n, 1) for k, v in counts.items()}
    return per_call, n / elapsed


def _print(title: str, per_call: dict[str, float], rate: float) -> None:
    total = sum(per_call.values())
    print(f"\n{title}: {rate:.1f} calls/s, {total:.2f} CPU ms per call (all processes)")
    for name, ms in sorted(per_call.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28} {ms:8.3f} ms  {ms / total * 100:5.1f}%")


def main() -> None:
    """Profile ours and torch RPC on one scenario."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["transport", "moe"])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per expert server / rpc worker")
    p.add_argument("--only", choices=["ours", "rpc"], help="profile one side only")
    p.add_argument("--tcp", action="store_true",
                   help="transport over TCP: the gateway's lanes against torch RPC restricted to TCP")
    args = p.parse_args()
    keep_large_buffers()
    me = os.getpid()
    loop = bench_loop()
    try:
        if args.scenario == "transport":
            x, ids, w = transport.payload(2048, 6, args.tokens, getattr(torch, args.dtype))
            variant = "ours tcp lanes" if args.tcp else "ours unix"
            with EchoPhase(loop) as phase:
                ours = transport.grpc_variants(phase, x, ids, w)[variant]
                _print(f"{variant}, {x.numel() * x.element_size()} B echo", *profile(ours, [me, phase.proc.pid],
                                                                                      args.seconds))
            with RpcPhase(workers=1, tcp_only=args.tcp) as group:
                _print("torch RPC" + (" tcp-only" if args.tcp else ""),
                       *profile(lambda: rpc.rpc_sync(group.names[0], rpc_worker.echo, args=(x, ids, w)),
                                [me, *(q.pid for q in group.procs)], args.seconds))
        else:
            shape = Shape()
            path = ensure_checkpoint(shape, ROOT / "bench-results")
            router = Checkpoint(path).load(Checkpoint(path).spec.router_name(0))
            x = make_input(shape, args.tokens)
            if args.only != "rpc":
                with GrpcPhase(loop, path, shape, dtype=args.dtype, threads=args.threads) as phase:
                    backend = phase.dispatcher()
                    _print(f"ours, MoE layer, {args.tokens} tokens, {args.threads} thread(s) per server",
                           *profile(lambda: moe_layer(x, router, shape.top_k, backend),
                                    [me, *(q.pid for q in phase.procs)], args.seconds))
            if args.only == "ours":
                return
            with RpcPhase(2, path, shape, args.dtype, threads=args.threads) as group:
                backend = RpcSeedDesign(owner_table(shape, 2), group.names, getattr(torch, args.dtype))
                _print(f"torch RPC (seed design), MoE layer, {args.tokens} tokens",
                       *profile(lambda: moe_layer(x, router, shape.top_k, backend),
                                [me, *(q.pid for q in group.procs)], args.seconds))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
