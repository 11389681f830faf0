"""OpenMP's spin after a parallel region: what a short one costs the CPU experts' compute, what a long one burns.

    python -m benchmarks.openmp_spin [--spins 300000,10000] [--tokens 1,16,512] [--repeats 21] [--rounds 3] [--out F]

Each GOMP_SPINCOUNT in a process of its own (libgomp reads it once, when torch loads it; 300,000 is libgomp's
default, 10,000 moe-serve's: process/openmp.py), the settings alternating over `--rounds`. In each: one MoE
layer at DeepSeek-MoE-16B's shape with every expert in the process (the expert server's bank, torch's default
threads: one per core), timed per token count (median of `--repeats`), and the process's CPU time in the 10 ms
of idle after each computation: what its waiting OpenMP workers burn between calls, which in a serving process
is taken from the threads moving the next call's bytes (benchmarks.lane_costs' `torch copy, then landed`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import machine
from tests.support import ROOT

IDLE = 0.01  # s of idle after each computation, over which the process's CPU time is read


def measure(tokens: list[int], repeats: int) -> dict:
    """In this process: {tokens: {"compute_ms", "idle_cpu_ms"}} (medians), torch's threads."""
    import torch

    from benchmarks.model import LAYER, InProcess, Shape, ensure_checkpoint, make_input
    from moe_serve.model.checkpoint import Checkpoint

    shape = Shape()
    bank = InProcess(Checkpoint(ensure_checkpoint(shape, ROOT / "bench-results")), torch.float32)
    gen = torch.Generator().manual_seed(1)
    out = {}
    for t in tokens:
        x = make_input(shape, t)
        weights, ids = torch.randn(t, shape.experts, generator=gen).softmax(-1).topk(shape.top_k)
        for _ in range(3):
            bank.run(LAYER, x, ids, weights)
        compute, idle = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            bank.run(LAYER, x, ids, weights)
            compute.append(time.perf_counter() - start)
            cpu = time.process_time()
            time.sleep(IDLE)
            idle.append(time.process_time() - cpu)
        out[t] = {"compute_ms": round(statistics.median(compute) * 1e3, 3),
                  "idle_cpu_ms": round(statistics.median(idle) * 1e3, 3)}
    return {"threads": torch.get_num_threads(), "spin": os.environ.get("GOMP_SPINCOUNT"), "tokens": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spins", default="300000,10000", help="GOMP_SPINCOUNT values, comma-separated")
    p.add_argument("--tokens", default="1,16,512")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one setting, in this process
    args = p.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.child:
        print(json.dumps(measure(tokens, args.repeats)), flush=True)
        return
    runs = []
    for round_ in range(args.rounds):
        for spin in args.spins.split(","):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"GOMP_SPINCOUNT": spin}
            child = subprocess.run([sys.executable, "-m", "benchmarks.openmp_spin", "--child", "--tokens", args.tokens,
                                    "--repeats", str(args.repeats)], env=env, cwd=ROOT, capture_output=True,
                                   text=True, check=True, timeout=900)
            run = json.loads(child.stdout.strip().splitlines()[-1]) | {"round": round_}
            runs.append(run)
            cells = "  ".join(f"{t} tok {v['compute_ms']:7.2f} ms, idle CPU {v['idle_cpu_ms']:6.2f} ms"
                              for t, v in run["tokens"].items())
            print(f"round {round_} GOMP_SPINCOUNT {spin:>7s} ({run['threads']} threads): {cells}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python -m benchmarks.openmp_spin " + " ".join(sys.argv[1:]),
                                              "machine": machine.describe(), "idle_s": IDLE, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
