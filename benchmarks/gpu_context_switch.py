"""What it costs when two processes take turns on one GPU, as a gateway and a same-GPU expert server do.

A ping-pong over a pipe: each side, on its turn, launches a small kernel, waits for it, and hands the turn
over. Three arrangements, same number of kernels and hand-offs:
  - one process, two threads (one CUDA context): the floor of a kernel + wait + hand-off;
  - two processes on the same GPU (two contexts: the driver time-slices between them);
  - two processes, the second on another GPU (when there is one).
The difference between the first two is the price of switching contexts per turn, which every
same-GPU expert call pays about twice (the server's kernels, then the gateway's). MPS (nvidia-cuda-mps)
runs both processes' kernels in one context and removes it.

    python -m benchmarks.gpu_context_switch --turns 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time

import torch


def _side(device: str, inbox, outbox, turns: int, size: int) -> None:
    x = torch.randn(size, device=device)
    for _ in range(turns):
        inbox.recv()
        x.mul_(1.0001)
        torch.cuda.synchronize(device)
        outbox.send(1)


def _run(turns: int, size: int, other_device: str | None, threads: bool) -> float:
    """Median seconds of one round (both sides' turns)."""
    a_in, b_out = mp.Pipe(duplex=False)
    b_in, a_out = mp.Pipe(duplex=False)
    if threads:
        other = threading.Thread(target=_side, args=("cuda:0", b_in, b_out, turns, size))
    else:
        other = mp.get_context("spawn").Process(target=_side, args=(other_device, b_in, b_out, turns, size))
    other.start()
    x = torch.randn(size, device="cuda:0")
    times = []
    for _ in range(turns):
        start = time.perf_counter()
        x.mul_(1.0001)
        torch.cuda.synchronize(0)
        a_out.send(1)
        a_in.recv()
        times.append(time.perf_counter() - start)
    other.join()
    return statistics.median(times[turns // 10:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=2000)
    p.add_argument("--size", type=int, default=1 << 16, help="elements the kernel of each turn touches")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = {"one process, two threads": _run(args.turns, args.size, None, True),
            "two processes, same GPU": _run(args.turns, args.size, "cuda:0", False)}
    if torch.cuda.device_count() > 1:
        rows["two processes, two GPUs"] = _run(args.turns, args.size, "cuda:1", False)
    result = {"gpu": torch.cuda.get_device_name(0), "turns": args.turns,
              "round_us": {k: v * 1e6 for k, v in rows.items()}}
    base = rows["one process, two threads"]
    for name, seconds in rows.items():
        print(f"{name:<28} {seconds * 1e6:8.1f} us per round  (+{(seconds - base) * 1e6:6.1f} us)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
