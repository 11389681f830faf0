"""What handing a split call's pieces to other threads costs: rpc/side_lanes.each against concurrent.futures.

    python -m benchmarks.hand_off [--pieces 4] [--calls 3000] [--rounds 3] [--out F]

`each` runs its first call on the caller's thread and the others on worker threads, then waits for them.
Before round 10 it submitted them to a ThreadPoolExecutor and waited on its Futures (a Condition each, in
Python); now a task goes into a SimpleQueue that idle workers wait on and the caller waits on a lock the worker
releases (both in C). Here every call returns at once, so what is measured is the hand-off alone: wall time
(median) and the process's CPU time per `each` of `--pieces` calls, the two ways interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks import machine
from moe_serve.rpc import side_lanes

_POOL = ThreadPoolExecutor(max_workers=side_lanes.MAX_WORKERS, thread_name_prefix="futures")


def futures_each(calls):
    """side_lanes.each as it was: the pool's Futures."""
    futures = [_POOL.submit(call) for call in calls[1:]]
    outcomes = [side_lanes._outcome(calls[0])]
    for future in futures:
        error = future.exception()
        outcomes.append((None, error) if error is not None else (future.result(), None))
    return outcomes


def measure(each, calls: list, n: int) -> tuple[float, float]:
    """(median wall seconds, CPU seconds per call) of `n` calls of each(calls)."""
    walls = []
    cpu = time.process_time()
    for _ in range(n):
        start = time.perf_counter()
        each(calls)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), (time.process_time() - cpu) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pieces", type=int, default=4)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    calls = [lambda: None] * args.pieces
    ways = {"concurrent.futures (before)": futures_each, "side_lanes.each (now)": side_lanes.each}
    for each in ways.values():  # start the workers
        measure(each, calls, 200)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, each in ways.items():
            runs[name].append(measure(each, calls, args.calls))
    rows = {name: {"wall_us_median": round(statistics.median(w for w, _ in got) * 1e6, 1),
                   "cpu_us_per_call": round(statistics.median(c for _, c in got) * 1e6, 1),
                   "per_round": [(round(w * 1e6, 1), round(c * 1e6, 1)) for w, c in got]}
            for name, got in runs.items()}
    for name, row in rows.items():
        print(f"{name:30s} wall {row['wall_us_median']:7.1f} us, CPU {row['cpu_us_per_call']:7.1f} us per each() of "
              f"{args.pieces}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine.describe(), "pieces": args.pieces, "calls": args.calls,
                       "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
