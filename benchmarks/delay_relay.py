"""A TCP relay that adds a fixed one-way delay in each direction: the RTT of a real network, which this
machine's kernel cannot add (no netem qdisc).

Listens on 127.0.0.1:--port (0: any), prints the port on one line, and forwards every connection to --target. Each
direction has a reader thread that timestamps what it reads (up to 1 MiB at a time) and a writer thread
that sends it once --delay-us has passed since it was read, so bytes keep flowing while earlier bytes
wait: a pipe of fixed latency, not a stop-and-wait. Its own cost (the extra copies and wake-ups) is
measured by running it with --delay-us 0 beside a direct connection (benchmarks.shaped_links).
Serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import signal
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    queue: collections.deque = collections.deque()
    ready = threading.Condition()

    def read() -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                with ready:
                    queue.append((time.monotonic() + delay, data))
                    ready.notify()
                if not data:
                    return
        except OSError:
            with ready:
                queue.append((0.0, b""))
                ready.notify()

    def write() -> None:
        try:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def _serve(listener: socket.socket, target: tuple[str, int], delay: float) -> None:
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(target, timeout=10)
        except OSError:
            client.close()
            continue
        server.settimeout(None)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pump(client, server, delay)
        _pump(server, client, delay)


def main() -> None:
    """Relay 127.0.0.1:PORT -> --target with --delay-us each way, until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--delay-us", type=float, default=0.0, help="one-way delay added in each direction (us)")
    p.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (0 picks one)")
    args = p.parse_args()
    sys.setswitchinterval(0.0002)  # a waiting thread gets the GIL within 0.2 ms, not the default 5 ms
    host, port = args.target.rsplit(":", 1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_serve, args=(listener, (host, int(port)), args.delay_us / 1e6), daemon=True).start()
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
