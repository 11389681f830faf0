"""The printed tables and the JSON report; every ratio is 'their time / our time' (above 1: ours faster)."""

from __future__ import annotations

RPC_SEED = "torch RPC (seed design)"
RPC_COMBINE = "torch RPC + server combine"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _size(nbytes: int) -> str:
    return f"{nbytes // 1024} KiB" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):g} MiB"


def speed(row: dict, ours: str, theirs: str) -> float:
    """theirs' median time / ours': how many times faster ours is."""
    return row["variants"][theirs]["median"] / row["variants"][ours]["median"]


def normalised(row: dict, ours: str, theirs: str) -> float | None:
    """As `speed`, each side first divided by in-process timed in its own phases (load drifts between phases)."""
    v = {name: s["median"] for name, s in row["variants"].items()}
    grpc, torch_rpc = v.get("in-process, gRPC phases"), v.get("in-process, torch RPC phases")
    if grpc is None or torch_rpc is None:
        return None
    return (v[theirs] / torch_rpc) / (v[ours] / grpc)


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*line) for line in lines)])


def _payload(row: dict) -> str:
    return f"{_size(row['payload_bytes'])} ({row['tokens']} tok {row['dtype'].replace('float', 'fp')})"


SIDE_TCP = "ours tcp side channel"  # RunExperts frames over TCP from the calling thread (rpc/side_channel.py)
SIDE_LANES = "ours tcp side lanes"  # ... large calls split by rows over 4 connections, as the gateway does
SIDE_WIDE = "ours tcp side 8 lanes"  # ... over 8 connections (benchmarks.procs.WIDE_LANES): 1 MiB pieces at 8 MiB
SIDE_WHOLE = "ours tcp side lanes, whole frames"  # ... replies read into frames and copied together (before tails)
RAW_TCP = "raw tcp frames (floor)"  # the hidden states' bytes alone over one side-channel connection


def transport_table(rows: list[dict]) -> str:
    """Round-trip medians (ms), throughput (request + reply bytes / time) and speed ratios."""
    lines = []
    for row in rows:
        v = {name: s["median"] for name, s in row["variants"].items()}
        gbs = row["moved_bytes"] / 1e9
        lines.append([_payload(row), _ms(v["in-process"]), _ms(v["torch RPC"]), _ms(v["torch RPC tcp-only"]),
                      _ms(v["ours unix"]), _ms(v["ours tcp"]), _ms(v["ours tcp lanes"]), _ms(v[SIDE_TCP]),
                      _ms(v[SIDE_LANES]), f"{gbs / v['torch RPC tcp-only']:.2f}", f"{gbs / v[SIDE_LANES]:.2f}",
                      f"{speed(row, 'ours unix', 'torch RPC'):.2f}x",
                      f"{speed(row, 'ours tcp', 'torch RPC tcp-only'):.2f}x",
                      f"{speed(row, 'ours tcp lanes', 'torch RPC tcp-only'):.2f}x",
                      f"{speed(row, SIDE_TCP, 'torch RPC tcp-only'):.2f}x",
                      f"{speed(row, SIDE_LANES, 'torch RPC tcp-only'):.2f}x"])
    header = ["payload", "in-proc", "RPC", "RPC tcp", "ours unix", "grpc tcp 1 conn", "grpc tcp lanes", "side tcp",
              "side lanes", "RPC tcp GB/s", "side lanes GB/s", "unix/RPC", "grpc tcp/RPC tcp", "grpc lanes/RPC tcp",
              "side tcp/RPC tcp", "side lanes/RPC tcp"]
    return _table(header, lines)


def variants_table(rows: list[dict]) -> str:
    """Our wire path against its variants: before zerocopy, without the loop hand-off, split in two."""
    names = ["ours unix", "ours tcp", "ours tcp 2 lanes", "ours tcp lanes", "grpc+upb tcp (before)", "ours unix sync",
             "ours unix split2", SIDE_TCP, RAW_TCP, SIDE_WIDE, SIDE_WHOLE]
    lines = [[_payload(row), *(_ms(row["variants"][n]["median"]) if n in row["variants"] else "-" for n in names),
              f"{speed(row, 'ours tcp', 'grpc+upb tcp (before)'):.2f}x", f"{speed(row, SIDE_TCP, RAW_TCP):.2f}x",
              f"{speed(row, SIDE_WIDE, 'torch RPC tcp-only'):.2f}x" if SIDE_WIDE in row["variants"] else "-"]
             for row in rows]
    return _table(["payload", "unix", "tcp", "tcp 2 lanes", "tcp 4 lanes", "upb tcp (before)", "unix, no loop hop",
                   "unix, split in 2", "side tcp 1 conn", "raw tcp frames", "side 8 lanes", "side lanes, whole frames",
                   "tcp vs before",
                   "side vs raw", "side 8 lanes/RPC tcp"], lines)


SHM = "ours, shared memory"  # same-host servers reached through /dev/shm arenas, called by gRPC
LOCAL = "ours, same-host channel"  # ... and called over the same-host channel from the model thread


def moe_table(rows: list[dict]) -> str:
    """Per-layer medians (ms) and speed ratios of ours against each other variant."""
    lines = []
    for row in rows:
        v = {name: s["median"] for name, s in row["variants"].items()}
        err = row.get("errors", {}).get("ours", {}).get("rel_rms")
        sync = f" (no hop {_ms(v['ours sync'])})" if "ours sync" in v else ""
        norm = normalised(row, "ours", RPC_SEED)
        lines.append([row["dtype"], str(row["tokens"]), _ms(v["in-process"]), _ms(v["ours"]) + sync, _ms(v[RPC_SEED]),
                      _ms(v[RPC_COMBINE]), f"{speed(row, 'ours', 'in-process'):.2f}x",
                      f"{speed(row, 'ours', RPC_SEED):.2f}x", "-" if norm is None else f"{norm:.2f}x",
                      f"{speed(row, 'ours', RPC_COMBINE):.2f}x", "-" if err is None else f"{err:.1e}",
                      *((_ms(v[SHM]), f"{speed(row, SHM, 'in-process'):.2f}x", f"{speed(row, SHM, RPC_SEED):.2f}x")
                        if SHM in v else ("-", "-", "-")),
                      *((_ms(v[LOCAL]), _ms(v[LOCAL] - v["in-process"]), f"{speed(row, LOCAL, RPC_SEED):.2f}x")
                        if LOCAL in v else ("-", "-", "-"))])
    header = ["dtype", "tokens", "in-proc ms", "ours ms", "RPC seed ms", "RPC+comb ms", "vs in-proc", "vs RPC seed",
              "(normalised)", "vs RPC+comb", "ours err", "ours shm ms", "shm vs in-proc", "shm vs RPC seed",
              "same-host ms", "same-host - in-proc ms", "same-host vs RPC seed"]
    return _table(header, lines)


def wire_table(rows: list[dict]) -> str:
    """Per wire dtype: time per layer and error against the fp32 in-process output."""
    lines = []
    for row in rows:
        base = row["variants"]["float32"]["median"]
        for name, s in row["variants"].items():
            e = row["errors"][name]
            lines.append([str(row["tokens"]), name, _ms(s["median"]), f"{base / s['median']:.2f}x",
                          f"{e['rel_rms']:.2e}", f"{e['max_abs']:.2e}", f"{e['ref_max_abs']:.2f}"])
    return _table(["tokens", "wire dtype", "ms", "vs fp32 wire", "rel RMS err", "max abs err", "max |ref|"], lines)


def threads_table(rows: list[dict]) -> str:
    """Per-layer medians per torch-threads setting of the expert servers."""
    lines = []
    for row in rows:
        settings = sorted(row["threads"])
        base = row["threads"][settings[0]]["median"]
        for n in settings:
            s = row["threads"][n]
            lines.append([str(row["tokens"]), str(n), _ms(s["median"]), f"{_ms(s['p25'])}-{_ms(s['p75'])}",
                          f"{s['median'] / base:.2f}x"])
    return _table(["tokens", "threads/server", "ours ms", "p25-p75", f"time vs {settings[0]} thread"], lines)


def targets(transport: list[dict], moe: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured ratio and whether it is met."""
    out = []
    for row in transport:
        if row["payload_bytes"] >= 1 << 20:
            out.append({"target": f"transport {_size(row['payload_bytes'])} throughput >= 1.0x torch RPC",
                        "ratio": speed(row, "ours unix", "torch RPC"), "needed": 1.0})
        if row["payload_bytes"] == 4096:
            out.append({"target": "4 KiB round trip <= torch RPC's", "ratio": speed(row, "ours unix", "torch RPC"),
                        "needed": 1.0})
        if SIDE_TCP in row["variants"]:  # across hosts: TCP against torch RPC restricted to TCP
            needed = 1.5 if row["payload_bytes"] >= 8 << 20 else 1.0
            out.append({"target": f"TCP {_size(row['payload_bytes'])} round trip >= {needed}x torch RPC tcp-only",
                        "ratio": speed(row, SIDE_LANES, "torch RPC tcp-only"), "needed": needed})
    for row in moe:
        if row["tokens"] >= 512:
            out.append({"target": f"MoE {row['dtype']} {row['tokens']} tokens >= 0.9x in-process",
                        "ratio": speed(row, "ours", "in-process"), "needed": 0.9})
            out.append({"target": f"MoE {row['dtype']} {row['tokens']} tokens >= 1.5x torch RPC design",
                        "ratio": speed(row, "ours", RPC_SEED), "normalised": normalised(row, "ours", RPC_SEED),
                        "needed": 1.5})
        if row["tokens"] == 1:
            out.append({"target": f"MoE {row['dtype']} 1 token latency <= torch RPC design",
                        "ratio": speed(row, "ours", RPC_SEED), "normalised": normalised(row, "ours", RPC_SEED),
                        "needed": 1.0})
    for t in out:
        t["met"] = t["ratio"] >= t["needed"]
    return out


def targets_table(rows: list[dict]) -> str:
    """Targets with their measured ratios (and, against torch RPC, the in-process-normalised one)."""
    def norm(t: dict) -> str:
        return f"{t['normalised']:.2f}x" if t.get("normalised") is not None else ""

    return _table(["target", "measured", "normalised", "met"],
                  [[t["target"], f"{t['ratio']:.2f}x", norm(t), "yes" if t["met"] else "NO"] for t in rows])
