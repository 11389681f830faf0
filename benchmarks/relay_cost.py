"""The delaying relay's own cost: side-channel echoes direct and through relays at --delay-us 0, on loopback.

    python -m benchmarks.relay_cost                                   # the relay benchmarks.shaped_links uses
    git show b80befa:benchmarks/delay_relay.py > /tmp/bytes_relay.py  # the first relay (bytes through Python)
    python -m benchmarks.relay_cost --relays benchmarks/delay_relay.py,/tmp/bytes_relay.py

Every relay forwards to the same echo server (benchmarks.echo_server's side channel); the variants are interleaved
and each size reports medians (ms). Then one-byte pings direct and through each relay at a few delays: the RTT a
shaped-link row really had, against the one it asked for. What a relay adds here is what it adds to every row of the
shaped-link runs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.procs import _python
from benchmarks.timing import interleaved, summary
from benchmarks.transport import side_call
from moe_serve.rpc.side_channel import SideLink

HIDDEN = 2048


class Relay:
    """A delaying relay process to `target` with `rtt_us` split over the two directions: benchmarks.delay_relay, or
    another relay `script` (a file run as a script) with the same flags."""

    def __init__(self, target: str, rtt_us: float, port: int = 0, script: str | None = None):
        command = ("-m", "benchmarks.delay_relay") if script is None else (script,)
        self.proc = _python(*command, "--target", target, "--delay-us", str(rtt_us / 2), "--port", str(port),
                            label="relay", stdout=subprocess.PIPE)
        self.port = int(self.proc.popen.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.stop(10)


def byte_echo() -> str:
    """A thread echoing every byte it gets on each connection, which it closes when the peer does; its address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    def accept() -> None:
        while True:
            threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def ping_us(address: str, repeats: int = 300) -> float:
    """Median round trip of one byte (us): what a relay adds to every call, beside its delay."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[repeats // 10:]) * 1e6


def pings(relays: list[str], delays_us: list[float]) -> dict:
    """One-byte round trips direct and through each relay at each one-way delay."""
    target = byte_echo()
    out = {"direct": ping_us(target)}
    for path in relays:
        for delay in delays_us:
            relay = Relay(target, 2 * delay, script=path)
            try:
                out[f"through {path}, RTT {2 * delay:g} us"] = ping_us(relay.address)
            finally:
                relay.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relays", default="benchmarks/delay_relay.py", help="relay scripts, comma-separated")
    p.add_argument("--tokens", default="8,128,512,1024", help="rows of hidden 2048 fp32 (8 KiB each), comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--delays-us", default="0,50,100", help="one-way delays of the one-byte pings, comma-separated")
    p.add_argument("--out", default="", help="JSON report (default: none)")
    args = p.parse_args(argv)
    info = machine.describe()
    print(f"relay cost on {machine.one_line(info)}", flush=True)
    relays: list[Relay] = []
    links: dict[str, list[SideLink]] = {}
    with tempfile.TemporaryDirectory() as work:
        echo = _python("-m", "benchmarks.echo_server", "--unix", f"unix:{work}/echo.sock", label="echo",
                       stdout=subprocess.PIPE)
        try:
            side = json.loads(echo.popen.stdout.readline())["side_tcp"]
            links["direct"] = [SideLink(side, tcp=True, max_bytes=1 << 30)]
            for path in args.relays.split(","):
                relays.append(relay := Relay(side, 0.0, script=path))
                links[f"through {path}"] = [SideLink(relay.address, tcp=True, max_bytes=1 << 30)]
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
            for relay in relays:
                relay.close()
            echo.stop(10)
    relays = args.relays.split(",")
    ping = pings(relays, [float(d) for d in args.delays_us.split(",")])
    print("one-byte round trips: " + ", ".join(f"{k} {v:.0f} us" for k, v in ping.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python -m benchmarks.relay_cost " + " ".join(
            argv if argv is not None else sys.argv[1:]), "machine": info, "rows": rows, "ping_us": ping},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
