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

    python benchmarks/load.py                      # the full run (about 10 minutes on 2 cores)
    python benchmarks/load.py --quick              # a smoke run (under a minute)
    python benchmarks/load.py --write-doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from load_clients import LoadResult, forward_load, generate_load, run_experts_load
from load_cluster import ModelSize, expert_server, gateway, write_checkpoint

CONFIGS = {"unbatched": ["--no-batching", "--no-overlap"], "batched": ["--no-overlap"], "batched+overlap": []}
SIZE = ModelSize()  # hidden 512, 4 layers, 8 experts top-2 of width 512, shared expert 512, vocab 2048
BEGIN, END = "<!-- load-benchmark:begin -->", "<!-- load-benchmark:end -->"


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


def summary(cells: list[LoadResult]) -> dict:
    """Medians over repeats of one (RPC, clients, config) cell, and every outcome counted."""
    outcomes = Counter()
    for c in cells:
        outcomes.update(c.outcomes)
    shares = [statistics.median(c.expert_share) for c in cells if c.expert_share]
    return {
        "tokens_per_s": statistics.median(c.tokens_per_second for c in cells),
        "runs_tokens_per_s": [round(c.tokens_per_second, 1) for c in cells],
        "p50_s": statistics.median(c.percentile(50) for c in cells),
        "p99_s": statistics.median(c.percentile(99) for c in cells),
        "first_token_p50_s": statistics.median(statistics.median(c.first_token) for c in cells)
        if all(c.first_token for c in cells) else None,
        "expert_share": statistics.median(shares) if shares else None,
        "outcomes": dict(outcomes),
    }


def run_gateways(args, checkpoint: Path, servers: list[str], logs: Path, front: set[int] | None) -> dict:
    """Every (RPC, clients, config) cell, `repeats` times, configs interleaved."""
    gateways = {name: gateway(checkpoint, servers, flags, logs / f"gateway-{name}.log", 1, front)
                for name, flags in CONFIGS.items()}
    cells: dict[tuple[str, int, str], list[LoadResult]] = {}
    try:
        for rep in range(args.repeats):
            for rpc in ("Generate", "Forward"):
                for n in args.levels:
                    names = list(CONFIGS)
                    names = names[rep % 3:] + names[:rep % 3]  # no configuration always runs first
                    for name in names:
                        address = gateways[name].address
                        if rpc == "Generate":
                            r = generate_load(address, n, args.window, args.prompt_tokens, args.new_tokens,
                                              SIZE.vocab, args.drain, seed=rep)
                        else:
                            r = forward_load(address, n, args.window, (1, args.forward_tokens, SIZE.hidden),
                                             args.drain, seed=rep)
                        cells.setdefault((rpc, n, name), []).append(r)
                        print(f"  sweep {rep + 1}/{args.repeats} {rpc:8s} {n:3d} clients {name:16s} "
                              f"{r.tokens_per_second:7.0f} tok/s  p50 {r.percentile(50):6.3f}s "
                              f"p99 {r.percentile(99):6.3f}s  {dict(r.outcomes)}", flush=True)
    finally:
        for g in gateways.values():
            g.stop()
    return {key: summary(value) for key, value in cells.items()}


def run_merge(args, checkpoint: Path, logs: Path, back: set[int] | None) -> dict:
    """RunExperts from many callers straight to one server: merging concurrent calls on, and off."""
    owned = list(range(SIZE.experts // 2))
    experts = f"0-{owned[-1]}"
    servers = {merge: expert_server(checkpoint, experts, logs / f"merge-{merge}.log", 1, back, merge=merge)
               for merge in (True, False)}
    cells: dict[tuple[int, bool], list[LoadResult]] = {}
    try:
        for rep in range(args.repeats):
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
    return {key: summary(value) for key, value in cells.items()}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def report(args, results: dict, merge: dict, machine: dict) -> str:
    """The markdown tables of docs/benchmarks.md's load section."""
    lines = [f"Measured {machine['date']} on {machine['machine']}; load average {machine['load_before']} before, "
             f"{machine['load_after']} after (other work shares this machine). {args.repeats} sweeps of "
             f"{args.window:g} s windows, medians; pinning: {machine['pinning']}.", ""]
    for rpc in ("Generate", "Forward"):
        unit = (f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each (greedy)" if rpc == "Generate"
                else f"one {args.forward_tokens}-token sequence each")
        lines += [f"**{rpc}** ({unit}); tokens/s, p50 / p99 latency in ms:", "",
                  "| clients | unbatched | batched | batched + overlap | batching gain | overlap gain | "
                  "expert share | requests ok / issued |", "|---|---|---|---|---|---|---|---|"]
        for n in args.levels:
            row = {name: results[(rpc, n, name)] for name in CONFIGS}
            cells = [f"{r['tokens_per_s']:.0f}, {_ms(r['p50_s'])} / {_ms(r['p99_s'])}" for r in row.values()]
            batching = row["batched"]["tokens_per_s"] / row["unbatched"]["tokens_per_s"]
            overlap = row["batched+overlap"]["tokens_per_s"] / row["batched"]["tokens_per_s"]
            share = row["batched"]["expert_share"]
            ok = sum(r["outcomes"].get("ok", 0) for r in row.values())
            issued = sum(sum(r["outcomes"].values()) for r in row.values())
            others = Counter()
            for r in row.values():
                others.update({k: v for k, v in r["outcomes"].items() if k != "ok"})
            lines.append(f"| {n} | {' | '.join(cells)} | {batching:.2f}x | {overlap:.2f}x | "
                         f"{'-' if share is None else f'{share:.0%}'} | {ok} / {issued}"
                         f"{' (' + ', '.join(f'{k} {v}' for k, v in others.items()) + ')' if others else ''} |")
        lines.append("")
    one = {name: results[("Generate", args.levels[0], name)]["tokens_per_s"] for name in CONFIGS}
    for n in args.levels[1:]:
        lines.append(f"Generate, {n} clients vs {args.levels[0]}: " + ", ".join(
            f"{name} {results[('Generate', n, name)]['tokens_per_s'] / one[name]:.1f}x" for name in CONFIGS) + ".")
    lines += ["", f"**RunExperts straight to one expert server** ({args.prompt_tokens} tokens a call, layer 0, "
              f"{SIZE.experts // 2} of {SIZE.experts} experts there); tokens/s, p50 latency in ms:", "",
              "| callers | merging on | merging off | gain |", "|---|---|---|---|"]
    for callers in sorted({c for c, _ in merge}):
        on, off = merge[(callers, True)], merge[(callers, False)]
        lines.append(f"| {callers} | {on['tokens_per_s']:.0f}, {_ms(on['p50_s'])} | {off['tokens_per_s']:.0f}, "
                     f"{_ms(off['p50_s'])} | {on['tokens_per_s'] / off['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def write_doc(path: Path, body: str) -> None:
    """Put `body` between the markers (appending a section with them if the file has none)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + f"\n\n## Load: many clients at once\n\n{block}\n"
    path.write_text(text)


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
            results = run_gateways(args, checkpoint, [s.address for s in servers], root, front)
        finally:
            for s in servers:
                s.stop()
        merge = run_merge(args, checkpoint, root, back)
    machine["load_after"] = round(os.getloadavg()[0], 1)
    body = report(args, results, merge, machine)
    print(f"\n{body}\n\n(took {time.monotonic() - started:.0f} s)")
    if args.json:
        raw = {"machine": machine, "cells": {"/".join(map(str, k)): v for k, v in results.items()},
               "merge": {f"{c}/{m}": v for (c, m), v in merge.items()}}
        Path(args.json).write_text(json.dumps(raw, indent=2))
    if args.write_doc:
        write_doc(Path(args.write_doc), body)


if __name__ == "__main__":
    main()
