"""The delaying relay's own cost: side-channel echoes direct and through relays at --delay-us 0, on loopback.

    python -m benchmarks.relay_cost                                   # the relay benchmarks.shaped_links uses
    git show b80befa:benchmarks/delay_relay.py > /tmp/bytes_relay.py  # the first relay (bytes through Python)
    python -m benchmarks.relay_cost --relays benchmarks/delay_relay.py,/tmp/bytes_relay.py

Every relay forwards to the same echo server (benchmarks.echo_server's side channel); the variants are interleaved
and each size reports medians (ms). What a relay adds here is what it adds to every row of the shaped-link runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import machine
from benchmarks.procs import _python
from benchmarks.timing import interleaved, summary
from benchmarks.transport import side_call
from moe_serve.rpc.side_channel import SideLink

HIDDEN = 2048


def _relay(path: str, target: str):
    """A relay process (a module file run as a script) to `target` with no delay, and its address."""
    proc = _python(path, "--target", target, "--delay-us", "0", label=Path(path).stem, stdout=subprocess.PIPE)
    return proc, f"127.0.0.1:{int(proc.popen.stdout.readline())}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relays", default="benchmarks/delay_relay.py", help="relay scripts, comma-separated")
    p.add_argument("--tokens", default="8,128,512,1024", help="rows of hidden 2048 fp32 (8 KiB each), comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="", help="JSON report (default: none)")
    args = p.parse_args(argv)
    info = machine.describe()
    print(f"relay cost on {machine.one_line(info)}", flush=True)
    procs = []
    links: dict[str, list[SideLink]] = {}
    with tempfile.TemporaryDirectory() as work:
        try:
            echo = _python("-m", "benchmarks.echo_server", "--unix", f"unix:{work}/echo.sock", label="echo",
                           stdout=subprocess.PIPE)
            procs.append(echo)
            side = json.loads(echo.popen.stdout.readline())["side_tcp"]
            links["direct"] = [SideLink(side, tcp=True, max_bytes=1 << 30)]
            for path in args.relays.split(","):
                proc, address = _relay(path, side)
                procs.append(proc)
                links[f"through {path}"] = [SideLink(address, tcp=True, max_bytes=1 << 30)]
            rows = []
            for tokens in (int(t) for t in args.tokens.split(",")):
                times = interleaved({name: side_call(v, HIDDEN, tokens) for name, v in links.items()},
                                    args.repeats, warmup=2)
                row = {"bytes_each_way": tokens * HIDDEN * 4, "variants": {k: summary(v) for k, v in times.items()}}
                rows.append(row)
                print(f"{row['bytes_each_way'] / 2**20:g} MiB each way: " + ", ".join(
                    f"{k} {v['median'] * 1e3:.2f} ms" for k, v in row["variants"].items()), flush=True)
        finally:
            for link_list in links.values():
                for link in link_list:
                    link.close()
            for proc in procs:
                proc.stop(10)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python -m benchmarks.relay_cost " + " ".join(
            argv if argv is not None else sys.argv[1:]), "machine": info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
