"""The load benchmark's summaries and its markdown section of docs/benchmarks.md."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from benchmarks.load_clients import LoadResult

BEGIN, END = "<!-- load-benchmark:begin -->", "<!-- load-benchmark:end -->"


def summary(cells: list[LoadResult]) -> dict:
    """Medians over repeats of one cell, and every outcome counted."""
    outcomes = Counter()
    for c in cells:
        outcomes.update(c.outcomes)
    shares = [statistics.median(c.expert_share) for c in cells if c.expert_share]
    roles = sorted({role for c in cells for role in c.cpu_ms_per_token})
    return {
        "tokens_per_s": statistics.median(c.tokens_per_second for c in cells),
        "runs_tokens_per_s": [round(c.tokens_per_second, 1) for c in cells],
        "p50_s": statistics.median(c.percentile(50) for c in cells),
        "p99_s": statistics.median(c.percentile(99) for c in cells),
        "first_token_p50_s": statistics.median(statistics.median(c.first_token) for c in cells)
        if all(c.first_token for c in cells) else None,
        "expert_share": statistics.median(shares) if shares else None,
        "cpu_ms_per_token": {r: statistics.median(c.cpu_ms_per_token[r] for c in cells) for r in roles},
        "outcomes": dict(outcomes),
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _outcomes(rows: list[dict]) -> str:
    ok = sum(r["outcomes"].get("ok", 0) for r in rows)
    issued = sum(sum(r["outcomes"].values()) for r in rows)
    others = Counter()
    for r in rows:
        others.update({k: v for k, v in r["outcomes"].items() if k != "ok"})
    return f"{ok} / {issued}" + (f" ({', '.join(f'{k} {v}' for k, v in others.items())})" if others else "")


def _cpu(row: dict) -> str:
    cpu = row["cpu_ms_per_token"]
    return f"{cpu.get('gateway', float('nan')):.1f} / {cpu.get('experts', float('nan')):.1f}"


def report(args, size, configs: list[str], results: dict, extra: dict, merge: dict, per_call: dict,
           machine: dict) -> str:
    """Markdown tables of every measurement."""
    lines = [f"Measured {machine['date']} on {machine['machine']}; load average {machine['load_before']} before, "
             f"{machine['load_after']} after (other work shares this machine). {args.repeats} sweeps of "
             f"{args.window:g} s windows, medians; pinning: {machine['pinning']}.", ""]
    for rpc in ("Generate", "Forward"):
        unit = (f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each, greedy" if rpc == "Generate"
                else f"one {args.forward_tokens}-token sequence each")
        lines += [f"**{rpc}** ({unit}): tokens/s, then p50 / p99 latency in ms", "",
                  "| clients | unbatched | batched | batched + overlap | batching gain | overlap gain | "
                  "expert share | CPU ms/token, gateway / experts: batched, + overlap | requests ok / issued |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n in args.levels:
            row = [results[(rpc, n, name)] for name in configs]
            cells = [f"{r['tokens_per_s']:.0f}, {_ms(r['p50_s'])} / {_ms(r['p99_s'])}" for r in row]
            share = row[1]["expert_share"]
            lines.append(f"| {n} | {' | '.join(cells)} | {row[1]['tokens_per_s'] / row[0]['tokens_per_s']:.2f}x | "
                         f"{row[2]['tokens_per_s'] / row[1]['tokens_per_s']:.2f}x | "
                         f"{'-' if share is None else f'{share:.0%}'} | {_cpu(row[1])}, {_cpu(row[2])} | "
                         f"{_outcomes(row)} |")
        lines.append("")
    first = args.levels[0]
    for n in args.levels[1:]:
        ratios = [results[("Generate", n, name)]["tokens_per_s"] / results[("Generate", first, name)]["tokens_per_s"]
                  for name in configs]
        lines.append(f"Generate, {n} clients vs {first}: "
                     + ", ".join(f"{name} {r:.1f}x" for name, r in zip(configs, ratios, strict=True)) + ".")
    if extra:
        lines += ["", "**Generate with every step split in two** (`--overlap-min-tokens 1`), against the default "
                  "(steps under 64 tokens stay whole):", "",
                  "| clients | batched | + overlap (default) | + overlap, split always | CPU ms/token, gateway / "
                  "experts: batched, split always | requests ok / issued |", "|---|---|---|---|---|---|"]
        for n in sorted(extra):
            row = [results[("Generate", n, configs[1])], results[("Generate", n, configs[2])], extra[n]]
            lines.append(f"| {n} | " + " | ".join(f"{r['tokens_per_s']:.0f}" for r in row)
                         + f" | {_cpu(row[0])}, {_cpu(row[2])} | {_outcomes([row[2]])} |")
    lines += ["", f"**RunExperts straight to one expert server** ({size.experts // 2} of {size.experts} experts there, "
              "layer 0). One caller, by call size: p50 latency, and the server's CPU per call:", "",
              "| tokens a call | p50 ms | server CPU ms a call |", "|---|---|---|"]
    for tokens, r in sorted(per_call.items()):
        lines.append(f"| {tokens} | {r['p50_s'] * 1000:.1f} | {r['cpu_ms_per_token']['server'] * tokens:.1f} |")
    lines += ["", f"Many callers ({args.prompt_tokens} tokens a call), merging concurrent calls of a layer on and off: "
              "tokens/s, p50 latency in ms", "", "| callers | merging on | merging off | gain |", "|---|---|---|---|"]
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
