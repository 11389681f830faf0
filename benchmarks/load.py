"""Load benchmark: 1 to 128 concurrent clients of Generate and of Forward against a cluster on loopback
(two expert servers and the gateways as subprocesses), with batching and overlap each switched off and
on in the same run.

Three gateways share the expert servers: unbatched (--no-batching: each request alone on a worker
thread, as before), batched (--no-overlap) and batched+overlap. For every (RPC, clients) cell the three
run one after the other, in a rotating order, and the whole sweep repeats; the tables give medians over
the repeats, so a burst of outside load hurts one repeat of one cell rather than one configuration.
On a machine with two or more cores the gateways and this client share one core and the expert servers
another (sched_setaffinity), standing in for separate gateway and expert machines: without that, the
dense layers and the experts would share every core and nothing could overlap. Every request's outcome
is counted: ok, an error code, or unfinished when the drain limit passed.

    python -m benchmarks.load                      # the full run (about 10 minutes on 2 cores)
    python -m benchmarks.load --quick              # a smoke run (under a minute)
    python -m benchmarks.load --write-doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.load_clients import LoadResult, forward_load, generate_load, run_experts_load
from benchmarks.load_cluster import ModelSize, expert_server, gateway, write_checkpoint
from benchmarks.load_report import report, summary, write_doc
from tests.support.launch import ServiceProcess

CONFIGS = {"unbatched": ["--no-batching", "--no-overlap"], "batched": ["--no-overlap"], "batched+overlap": []}
# The overlap gateway again with every step split in two, at the concurrency where the default keeps steps whole.
SPLIT_ALWAYS, SPLIT_FLAGS, SPLIT_LEVELS = "batched+overlap,split", ["--overlap-min-tokens", "1"], (8, 32)
CALL_SIZES = (1, 16, 64, 256)  # tokens of one RunExperts call, for the cost of a call by size
SIZE = ModelSize()  # hidden 512, 4 layers, 8 experts top-2 of width 512, shared expert 512, vocab 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8,32,128", help="concurrency levels (default 1,8,32,128)")
    p.add_argument("--repeats", type=int, default=3, help="sweeps; tables give medians (default 3)")
    p.add_argument("--window", type=float, default=3.0, help="seconds of load per cell (default 3)")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds to wait after a window for requests still running (default 10)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--forward-tokens", type=int, default=16, help="tokens of each Forward request (one sequence)")
    p.add_argument("--no-pin", action="store_true", help="let every process use every core")
    p.add_argument("--quick", action="store_true", help="1 sweep, 1 and 8 clients, 1 s windows")
    p.add_argument("--json", help="write every cell's raw numbers here")
    p.add_argument("--write-doc", help="replace the section between the load-benchmark markers of this file")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.repeats, args.window, args.drain = "1,8", 1, 1.0, 10.0
    args.levels = [int(n) for n in args.clients.split(",")]
    return args


def cpu_sets(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(gateways and client, expert servers): one core each where there are two."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return None, None
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def measured(load, processes: dict[str, list[ServiceProcess]]) -> LoadResult:
    """Run `load()`, adding each group of processes' CPU milliseconds per token to its result."""
    before = {role: sum(p.cpu_seconds() for p in procs) for role, procs in processes.items()}
    result = load()
    for role, procs in processes.items():
        used = sum(p.cpu_seconds() for p in procs) - before[role]
        result.cpu_ms_per_token[role] = 1000 * used / max(result.tokens, 1)
    return result


def run_gateways(args, checkpoint: Path, servers: list[ServiceProcess], logs: Path, front: set[int] | None):
    """Every (RPC, clients, config) cell, `repeats` times, configs interleaved; and the split-always cells."""
    addresses = [s.address for s in servers]
    gateways = {name: gateway(checkpoint, addresses, flags, logs / f"gateway-{i}.log", 1, front)
                for i, (name, flags) in enumerate({**CONFIGS, SPLIT_ALWAYS: SPLIT_FLAGS}.items())}
    cells: dict[tuple, list[LoadResult]] = {}
    try:
        for rep in range(args.repeats):
            for rpc in ("Generate", "Forward"):
                for n in args.levels:
                    names = list(CONFIGS)
                    names = names[rep % 3:] + names[:rep % 3]  # no configuration always runs first
                    if rpc == "Generate" and n in SPLIT_LEVELS:
                        names.append(SPLIT_ALWAYS)
                    for name in names:
                        address = gateways[name].address
                        if rpc == "Generate":
                            def load(address=address, n=n, rep=rep):
                                return generate_load(address, n, args.window, args.prompt_tokens, args.new_tokens,
                                                     SIZE.vocab, args.drain, seed=rep)
                        else:
                            def load(address=address, n=n, rep=rep):
                                return forward_load(address, n, args.window, (1, args.forward_tokens, SIZE.hidden),
                                                    args.drain, seed=rep)
                        r = measured(load, {"gateway": [gateways[name]], "experts": servers})
                        cells.setdefault((rpc, n, name), []).append(r)
                        print(f"  sweep {rep + 1}/{args.repeats} {rpc:8s} {n:3d} clients {name:22s} "
                              f"{r.tokens_per_second:7.0f} tok/s  p50 {r.percentile(50):6.3f}s "
                              f"p99 {r.percentile(99):6.3f}s  {dict(r.outcomes)}", flush=True)
    finally:
        for g in gateways.values():
            g.stop()
    results = {key: summary(value) for key, value in cells.items()}
    extra = {n: results.pop(("Generate", n, SPLIT_ALWAYS)) for n in SPLIT_LEVELS
             if ("Generate", n, SPLIT_ALWAYS) in results}
    return results, extra


def run_expert_calls(args, checkpoint: Path, logs: Path, back: set[int] | None) -> tuple[dict, dict]:
    """RunExperts straight to one server: the cost of a call by size, and many callers with merging on and off."""
    owned = list(range(SIZE.experts // 2))
    experts = f"0-{owned[-1]}"
    servers = {merge: expert_server(checkpoint, experts, logs / f"merge-{merge}.log", 1, back, merge=merge)
               for merge in (True, False)}
    per_call: dict[int, list[LoadResult]] = {}
    cells: dict[tuple[int, bool], list[LoadResult]] = {}
    try:
        for rep in range(args.repeats):
            for tokens in CALL_SIZES:
                def one_caller(tokens=tokens, rep=rep):
                    return run_experts_load(servers[True].address, 1, args.window / 2, tokens, SIZE.hidden,
                                            SIZE.experts, SIZE.top_k, owned, args.drain, seed=rep)
                per_call.setdefault(tokens, []).append(measured(one_caller, {"server": [servers[True]]}))
            for callers in [n for n in args.levels if n > 1] or [1]:
                for merge in ((True, False) if rep % 2 == 0 else (False, True)):
                    r = run_experts_load(servers[merge].address, callers, args.window, args.prompt_tokens,
                                         SIZE.hidden, SIZE.experts, SIZE.top_k, owned, args.drain, seed=rep)
                    cells.setdefault((callers, merge), []).append(r)
                    print(f"  sweep {rep + 1}/{args.repeats} RunExperts {callers:3d} callers merge={merge!s:5s} "
                          f"{r.tokens_per_second:7.0f} tok/s  p50 {r.percentile(50) * 1000:6.1f}ms", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return ({tokens: summary(value) for tokens, value in per_call.items()},
            {key: summary(value) for key, value in cells.items()})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    front, back = cpu_sets(not args.no_pin)
    if front:
        os.sched_setaffinity(0, front)
    machine = {"date": time.strftime("%Y-%m-%d"), "load_before": round(os.getloadavg()[0], 1),
               "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
                          f"Python {platform.python_version()}",
               "pinning": f"gateways + client on cores {sorted(front)}, expert servers on {sorted(back)}"
               if front else "none"}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moe-load-") as tmp:
        root = Path(tmp)
        checkpoint = write_checkpoint(root / "model", SIZE)
        print(f"Model: {SIZE}; logs in {root}", flush=True)
        half = SIZE.experts // 2
        servers = [expert_server(checkpoint, experts, root / f"expert-{i}.log", 1, back)
                   for i, experts in enumerate((f"0-{half - 1}", f"{half}-{SIZE.experts - 1}"))]
        try:
            results, extra = run_gateways(args, checkpoint, servers, root, front)
        finally:
            for s in servers:
                s.stop()
        per_call, merge = run_expert_calls(args, checkpoint, root, back)
    machine["load_after"] = round(os.getloadavg()[0], 1)
    body = report(args, SIZE, list(CONFIGS), results, extra, merge, per_call, machine)
    print(f"\n{body}\n\n(took {time.monotonic() - started:.0f} s)")
    if args.json:
        raw = {"machine": machine, "cells": {"/".join(map(str, k)): v for k, v in results.items()},
               "split_always": extra, "per_call": per_call, "merge": {f"{c}/{m}": v for (c, m), v in merge.items()}}
        Path(args.json).write_text(json.dumps(raw, indent=2))
    if args.write_doc:
        write_doc(Path(args.write_doc), body)


if __name__ == "__main__":
    main()
