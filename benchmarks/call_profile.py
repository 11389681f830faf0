"""Where a device-routed expert call's host time goes: py-spy over both processes during a chain of calls.

A real `moe-expert-server` process owns every expert of one DeepSeek-MoE-16B-shaped layer (as in
benchmarks.call_overhead); this process is the gateway, making device-routed calls (on the CPU over
/dev/shm, the same protocol). It times a chain of CHAIN calls (each on the previous one's output, no wait
in between: a decode step's MoE layers without the dense work), then keeps making such chains while
py-spy samples this process and the server's for SECONDS, and reports, for each side, the share of
samples in which each function is on the stack (a thread blocked in select or recv counts too: the
gateway's wait for the reply is what the server's work costs it).

    python -m benchmarks.call_profile --device cuda --out docs/bench/call-profile-h200.json
    python -m benchmarks.call_profile --device cpu --width 16 --seconds 10  # the 2-core machine

Needs the `py-spy` executable (pip install py-spy) and permission to read the server's memory (a child
of this process: allowed unless ptrace is locked down).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import machine
from benchmarks.call_overhead import CHAIN, layer_server, sync
from benchmarks.model import LAYER, Shape, make_input
from moe_client import wire
from moe_serve.core.routing import route
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.rpc.shared_regions import ArenaPool


def stack_shares(raw: Path, only: str = "", top: int = 30) -> dict:
    """From py-spy's raw output (one `frame;frame;... count` line per stack): samples, and for the `top`
    functions the share of samples (of stacks containing `only`) in which each is on the stack."""
    on_stack: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if only and only not in stack:
            continue
        total += int(count)
        names = set()
        for frame in stack.split(";"):  # "function (path/file.py:line)"
            function, _, where = frame.partition(" (")
            names.add(f"{function} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else function)
        for name in names:
            on_stack[name] += int(count)
    return {"samples": total, "share_on_stack": {name: round(n / max(total, 1), 4)
                                                 for name, n in on_stack.most_common(top)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--width", type=int, default=1408, help="expert width (a small one shows the call's own cost "
                   "on a CPU)")
    p.add_argument("--seconds", type=float, default=15.0, help="how long py-spy samples")
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples a second")
    p.add_argument("--checkpoints", default="bench-results")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    shape = Shape(width=args.width)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    with layer_server(shape, args.device, dtype, args.checkpoints) as (checkpoint, server, pool, loop):
        dispatcher = ExpertDispatcher(checkpoint.spec, pool, loop.loop, wire.dtype_from_name(dtype), 900.0,
                                      arenas=ArenaPool(), side_calls=True, device_routing=True)
        hidden = make_input(shape, args.tokens).to(args.device, torch_dtype)
        weights, ids = route(torch.randn(args.tokens, shape.experts), shape.top_k, False)
        ids, weights = ids.to(args.device), weights.to(args.device)

        def chain() -> None:
            h = hidden
            for _ in range(CHAIN):
                h = dispatcher.run(LAYER, h, ids, weights).to(torch_dtype)
            sync(args.device)

        for _ in range(20):
            chain()
        times = []
        for _ in range(50):
            start = time.perf_counter()
            chain()
            times.append(time.perf_counter() - start)
        rounds = dispatcher.routed_rounds
        workdir = Path(tempfile.mkdtemp(prefix="call-profile-"))
        raws = {side: workdir / f"{side}.txt" for side in ("gateway", "server")}
        spies = [subprocess.Popen([spy, "record", "--nonblocking", "-r", str(args.rate), "-f", "raw", "-o",
                                   str(raws[side]), "-p", str(pid), "-d", str(max(1, int(args.seconds)))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for side, pid in (("gateway", os.getpid()), ("server", server.popen.pid))]
        chains = 0
        spin_start = time.perf_counter()
        while any(s.poll() is None for s in spies):
            chain()
            chains += 1
        spun = time.perf_counter() - spin_start
        errors = [s.stderr.read() for s in spies if s.returncode]
        if errors:
            raise SystemExit(f"py-spy failed: {errors}")
        result = {"machine": machine.describe(), "device": args.device, "dtype": dtype, "shape": shape.__dict__,
                  "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                  "tokens": args.tokens, "routed": dispatcher.routed_rounds > rounds,
                  "chain_ms_per_call": statistics.median(times) * 1e3 / CHAIN,
                  "ms_per_call_while_sampled": spun * 1e3 / max(chains * CHAIN, 1),
                  "server": stack_shares(raws["server"]), "gateway": stack_shares(raws["gateway"], "chain")}
        print(f"chain of {CHAIN} at {args.tokens} tokens: {result['chain_ms_per_call']:.3f} ms a call "
              f"({result['ms_per_call_while_sampled']:.3f} while sampled)")
        for side in ("server", "gateway"):
            print(f"{side}: {result[side]['samples']} samples")
            for name, share in list(result[side]["share_on_stack"].items())[:20]:
                print(f"  {share * 100:5.1f}%  {name}")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        dispatcher.close()


if __name__ == "__main__":
    main()
