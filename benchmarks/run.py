"""`make bench`: the transport and MoE-layer benchmarks, printed as tables and written as JSON.

    python -m benchmarks.run              # default (--quick): ~10 minutes on the 2-core machine
    python -m benchmarks.run --full       # more token counts, rounds and repeats
    python -m benchmarks.run --smoke      # tiny shapes, seconds: checks the script end to end

Ratios are 'their time / our time' from the same run (above 1: ours is faster). The machine is
shared, so variants are interleaved, gRPC and torch RPC phases alternate, and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

# Before torch and grpc load: TensorPipe logs a warning per pipe when a phase's RPC group is torn down,
# and grpc an INFO line per connection when a phase's servers stop.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from benchmarks import machine, procs, report, transport
from benchmarks.model import Shape, ensure_checkpoint
from benchmarks.moe_layer import MoeBench
from benchmarks.procs import bench_loop
from moe_serve.process.malloc import keep_large_buffers
from tests.support import ROOT

SECTIONS = ("transport", "moe", "wire", "threads")
PLANS = {  # tokens per call, rounds of alternating phases, and what each section covers
    "smoke": {"tokens": [1, 4], "dtypes": ["float32"], "rounds": 1, "wire_tokens": [4],
              "thread_tokens": [4], "thread_settings": (1, 2), "thread_rounds": 1},
    "quick": {"tokens": [1, 16, 64, 512, 2048], "dtypes": ["float32", "bfloat16"], "rounds": 1,
              "wire_tokens": [16, 512], "thread_tokens": [16, 512], "thread_settings": (1, 2), "thread_rounds": 1},
    "full": {"tokens": [1, 4, 16, 64, 128, 256, 512, 1024, 2048], "dtypes": ["float32", "bfloat16"], "rounds": 3,
             "wire_tokens": [1, 16, 128, 512, 2048], "thread_tokens": [1, 128, 512, 2048],
             "thread_settings": (1, 2), "thread_rounds": 2},
}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections; print tables; write the JSON report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the default")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--out", help="JSON report path (default bench-results/bench-MODE.json)")
    p.add_argument("--checkpoints", default=str(ROOT / "bench-results"),
                   help="where the generated checkpoint is kept between runs (2.2 GB at full size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per expert server / rpc worker")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc malloc alone in this process, the echo server and the rpc workers "
                        "(the expert servers always keep large buffers); for the before/after of that tuning")
    args = p.parse_args(argv)
    mode_name = args.mode or "quick"
    plan = PLANS[mode_name]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    warnings.filterwarnings("ignore", message=".*ProcessGroupGloo.*")  # torch RPC's own deprecation notice
    shape = Shape(hidden=64, width=32, experts=8, top_k=2) if mode_name == "smoke" else Shape()
    smoke, quick = mode_name == "smoke", mode_name != "full"
    if args.malloc_default:
        procs.MALLOC_DEFAULT[:] = ["--malloc-default"]
    else:
        keep_large_buffers()  # this process is the gateway side (and torch RPC's master): tuned as the gateway is
    info = machine.describe()
    started = time.time()
    result = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
              "mode": mode_name, "machine": info, "shape": shape.__dict__, "plan": plan,
              "threads_per_server": args.threads, "malloc_tuned": not args.malloc_default,
              "ratio": "their median time / our median time"}
    print(f"moe-serve benchmarks ({mode_name}) on {machine.one_line(info)}", flush=True)
    loop = bench_loop()
    try:
        if "transport" in sections:
            rows = transport.run(loop, shape.hidden, shape.top_k, plan["rounds"], quick, smoke)
            result["transport"] = rows
            print("\nTransport: RunExperts-sized round trips, medians\n" + report.transport_table(rows), flush=True)
            print("\nTransport, variants of our wire path (ms)\n" + report.variants_table(rows), flush=True)
        if {"moe", "wire", "threads"} & set(sections):
            path = ensure_checkpoint(shape, Path(args.checkpoints))
            bench = MoeBench(loop, path, shape, quick, smoke, threads=args.threads, sync_variant=not quick)
            if "moe" in sections:
                rows = [row for dtype in plan["dtypes"] for row in bench.compare(plan["tokens"], dtype, plan["rounds"])]
                result["moe"] = rows
                print(f"\nOne MoE layer (hidden {shape.hidden}, {shape.experts} experts x {shape.width}, "
                      f"top-{shape.top_k}) over 2 servers, medians\n" + report.moe_table(rows), flush=True)
            if "wire" in sections:
                rows = bench.wire_dtypes(plan["wire_tokens"])
                result["wire_dtypes"] = rows
                print("\nWire dtypes (fp32 experts), error against fp32 in-process\n" + report.wire_table(rows),
                      flush=True)
            if "threads" in sections:
                rows = bench.threads_per_server(plan["thread_tokens"], plan["thread_settings"], plan["thread_rounds"])
                result["threads"] = rows
                print("\ntorch threads per expert server (2 servers + caller on this machine)\n"
                      + report.threads_table(rows), flush=True)
        if "transport" in result and "moe" in result:
            result["targets"] = report.targets(result["transport"], result["moe"])
            print("\nTargets (ratio = torch RPC or in-process time / ours)\n" + report.targets_table(result["targets"]))
    finally:
        loop.close()
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out or ROOT / "bench-results" / f"bench-{mode_name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['seconds']:.0f} s; JSON report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
