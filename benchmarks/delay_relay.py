"""A TCP relay that adds a fixed one-way delay in each direction: the RTT of a real network, which this
machine's kernel cannot add (no netem qdisc, nor fq for a BPF-set departure time).

Listens on 127.0.0.1:--port (0: any), prints the port on one line, and forwards every connection to --target. Each
direction has a pipe, a reader thread that splices what arrives into it and timestamps each piece, and a writer
thread that splices the piece on to the other socket once --delay-us has passed since it was read, so bytes keep
flowing while earlier bytes wait: a pipe of fixed latency, not a stop-and-wait. The bytes stay in the kernel
(splice moves page references from socket to pipe to socket); a first version read them into Python bytes and
added 3.5 ms to a 1 MiB round trip over a 10 Gbit/s shaped link on 2 cores, more than the link's own 1.7 ms
(docs/deployment-sizing.md). The pipe's capacity (PIPE_BYTES, where the kernel allows it) is what one direction
holds in flight, more than the bandwidth-delay product of any link measured here (25 Gbit/s x 100 us is 0.3 MiB).
Its own cost is measured by running it with --delay-us 0 beside a direct connection (benchmarks.relay_cost, and
the direct rows of benchmarks.shaped_links).
Serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import threading
import time

CHUNK = 1 << 20  # most bytes one splice takes from a socket
PIPE_BYTES = 4 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _pipe() -> tuple[int, int]:
    """A pipe as large as the kernel lets this process make it, up to PIPE_BYTES."""
    r, w = os.pipe()
    for size in (PIPE_BYTES, 1 << 20):  # above /proc/sys/fs/pipe-max-size (1 MiB) only with CAP_SYS_RESOURCE
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
            break
    return r, w


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    queue: collections.deque = collections.deque()  # (due, bytes) of each piece in the pipe; 0 bytes: the end
    ready = threading.Condition()
    pipe_r, pipe_w = _pipe()

    def read() -> None:
        # The sockets do not block: a splice waiting on the socket would hold the pipe's lock (the kernel's
        # splice_file_to_pipe), so the writer could not drain the pipe until more bytes came.
        arrived = select.poll()
        arrived.register(src.fileno(), select.POLLIN)
        try:
            while True:
                arrived.poll()
                try:
                    n = os.splice(src.fileno(), pipe_w, CHUNK)  # waits for room in the pipe only; 0: EOF
                except BlockingIOError:
                    continue
                with ready:
                    queue.append((time.monotonic() + delay, n))
                    ready.notify()
                if not n:
                    return
        except OSError:
            with ready:
                queue.append((0.0, 0))
                ready.notify()
        finally:
            os.close(pipe_w)  # each thread closes its own end: never a descriptor another thread still waits on

    def write() -> None:
        room = select.poll()
        room.register(dst.fileno(), select.POLLOUT)
        try:
            end = False
            while not end:
                with ready:
                    while not queue:
                        ready.wait()
                    due = queue[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                now, n = time.monotonic(), 0
                with ready:  # every piece due by now in one go: fewer wake-ups than pieces
                    while queue and queue[0][0] <= now and not end:
                        _, piece = queue.popleft()
                        n += piece
                        end = not piece
                while n:
                    try:
                        n -= os.splice(pipe_r, dst.fileno(), n)
                    except BlockingIOError:  # the socket's send buffer is full
                        room.poll()
        except OSError:
            pass
        finally:
            for s in (dst, src):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            os.close(pipe_r)  # a reader still filling the pipe gets EPIPE

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
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
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
