"""Steady Forward load on a running gateway while shell commands run one after another, each answer
checked against the in-process reference; exit status 1 if any request failed or the load stalled.

    python -m scripts.load_during --address 127.0.0.1:50050 --checkpoint /path/to/model \\
        --step 'docker kill expert-1' --step 'docker start expert-1 && wait-for-it'

`make compose-test` kills an expert container this way, then restarts it and waits for it to rejoin.
After the load warms up (--warmup good answers), each --step runs in bash and must exit 0, and then
--after good answers more must arrive before the next: so each fault is taken under load, and the
cluster serves on after it. Runs as a module from the repository root (it imports tests.support).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tests.support.load import Load


def main(argv: list[str] | None = None) -> int:
    """Run the load and the steps; print what was served and what failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="gateway address, host:port")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the cluster serves (for the reference)")
    p.add_argument("--step", action="append", default=[], help="a bash command to run under load (repeatable)")
    p.add_argument("--clients", type=int, default=4, help="concurrent callers (default 4)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per Forward (default 16)")
    p.add_argument("--warmup", type=int, default=20, help="good answers before the first step (default 20)")
    p.add_argument("--after", type=int, default=20, help="good answers after each step (default 20)")
    p.add_argument("--timeout", type=float, default=120, help="seconds each step and its answers may take")
    args = p.parse_args(argv)

    load = Load(args.address, args.checkpoint, clients=args.clients, tokens=args.tokens, generate_share=0.0).start()
    start = time.monotonic()
    status = 0
    try:
        load.wait_ok(args.warmup, args.timeout)
        for step in args.step:
            t0 = time.monotonic()
            done = subprocess.run(step, shell=True, executable="/bin/bash", timeout=args.timeout, check=False)
            if done.returncode != 0:
                print(f"step failed (exit {done.returncode}): {step}", flush=True)
                status = 1
                break
            ran = time.monotonic() - t0
            load.wait_ok(args.after, args.timeout)
            print(f"  {step}: {ran:.1f}s; then {args.after} good answers; longest wait for an answer since "
                  f"the step began {load.longest_gap(t0):.2f}s; {load.ok} served, {load.failed} failed so far",
                  flush=True)
    except TimeoutError as err:
        print(f"the load stalled: {err}", flush=True)
        status = 1
    finally:
        load.stop()
    print(f"{load.ok} requests served in {time.monotonic() - start:.0f}s, {load.failed} failed"
          + (f" {dict(load.errors)}; first: {load.first_errors[:3]}" if load.failed else ""), flush=True)
    return 1 if status or load.failed else 0


if __name__ == "__main__":
    sys.exit(main())
