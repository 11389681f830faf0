"""How round trips over several TCP connections at once scale on this host: the floor under the side lanes.

    python -m benchmarks.lane_floor [--sizes-mib 4,8,16] [--lanes 1,2,4,8] [--repeats 40] [--out F]

Bytes alone, no message: a payload split evenly over N loopback connections, each piece echoed back
by a server process (a 4-byte length, then the bytes; read with recv_into, sent with sendall). What it
tells apart, variants interleaved, medians:
- `two phases`: every piece sent (rpc/side_lanes.py: one thread a piece beyond the first), then every
  reply read the same way: the gateway's order (side_dispatch's SideRound.send, then result);
- `one phase`: each piece's thread sends its piece and reads its reply;
- `big buffers`: one phase, with SO_SNDBUF and SO_RCVBUF of 2x the largest piece on both ends (the
  kernel's autotuning off);
- `server procs`: one phase against a server that answers each connection from a process of its own
  (no GIL shared by the server's connections);
so whether a split call is bound by the order of its phases, the sockets' buffers, the server's one
interpreter, or the kernel's copies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from functools import partial

import numpy as np

from benchmarks import machine
from benchmarks.timing import interleaved, summary
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.rpc import side_lanes

_LEN = struct.Struct("<I")
MODES = ("threads", "procs", "big")  # server listeners: a thread a connection; a process; a thread, big buffers


def _read_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the peer closed")
        got += n


def _echo(conn: socket.socket) -> None:
    """Answer frames on `conn` until it closes: the bytes back as they came, from one reused buffer."""
    buffer = np.empty(0, np.uint8)
    head = memoryview(bytearray(_LEN.size))
    try:
        while True:
            _read_into(conn, head)
            (size,) = _LEN.unpack(head)
            if buffer.nbytes < size:
                buffer = np.empty(size, np.uint8)
            view = memoryview(buffer.data)[:size]
            _read_into(conn, view)
            conn.sendall(head)
            conn.sendall(view)
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()


def _listen(buffer_bytes: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if buffer_bytes:  # before listen: the window scale is agreed at the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _accept(listener: socket.socket, fork: bool) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not fork:
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()
        elif os.fork() == 0:  # the child answers this connection alone
            _echo(conn)
            os._exit(0)
        else:
            conn.close()


def serve(buffer_bytes: int) -> None:
    """Listen once per mode, print {"mode": port, ...}, answer until stdin closes."""
    keep_large_buffers()
    listeners = {"threads": _listen(0), "procs": _listen(0), "big": _listen(buffer_bytes)}
    forking = os.fork()
    if forking == 0:  # before any thread starts: a process that forks must have only the one thread
        _accept(listeners["procs"], fork=True)
    for mode in ("threads", "big"):
        threading.Thread(target=_accept, args=(listeners[mode], False), daemon=True).start()
    print(json.dumps({mode: listener.getsockname()[1] for mode, listener in listeners.items()}), flush=True)
    sys.stdin.read()  # the children answering one connection each end when the client closes it
    os.kill(forking, signal.SIGKILL)
    os.waitpid(forking, 0)


def _connect(port: int, buffer_bytes: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _send(sock: socket.socket, piece: memoryview) -> None:
    sock.sendall(_LEN.pack(piece.nbytes))
    sock.sendall(piece)


def _receive(sock: socket.socket, size: int) -> memoryview:
    head = memoryview(bytearray(_LEN.size))
    _read_into(sock, head)
    if _LEN.unpack(head)[0] != size:
        raise ConnectionError("a reply of the wrong size")
    view = memoryview(np.empty(size, np.uint8).data)  # fresh each call, as the side channel reads a reply
    _read_into(sock, view)
    return view


def _round_trip(sock: socket.socket, piece: memoryview) -> memoryview:
    _send(sock, piece)
    return _receive(sock, piece.nbytes)


def variants(conns: dict[str, list[socket.socket]], payload: np.ndarray, lanes: int) -> dict:
    pieces = [memoryview(p.data) for p in np.array_split(payload, lanes)]

    def two_phases() -> list:
        socks = conns["threads"][:lanes]
        pairs = list(zip(socks, pieces, strict=True))
        side_lanes.values(side_lanes.each([partial(_send, s, p) for s, p in pairs]))
        return side_lanes.values(side_lanes.each([partial(_receive, s, p.nbytes) for s, p in pairs]))

    def one_phase(mode: str) -> list:
        socks = conns[mode][:lanes]
        pairs = zip(socks, pieces, strict=True)
        return side_lanes.values(side_lanes.each([partial(_round_trip, s, p) for s, p in pairs]))

    return {"two phases": two_phases, "one phase": partial(one_phase, "threads"),
            "big buffers": partial(one_phase, "big"), "server procs": partial(one_phase, "procs")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="4,8,16")
    p.add_argument("--lanes", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", default=None)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the server: its big buffers' bytes
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    counts = [int(n) for n in args.lanes.split(",")]
    buffer_bytes = 2 * max(sizes)
    keep_large_buffers()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.lane_floor", "--serve", str(buffer_bytes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    conns: dict[str, list[socket.socket]] = {}
    try:
        ports = json.loads(server.stdout.readline())
        conns = {mode: [_connect(ports[mode], buffer_bytes if mode == "big" else 0) for _ in range(max(counts))]
                 for mode in MODES}
        rows = []
        rng = np.random.default_rng()
        for size in sizes:
            payload = rng.integers(0, 256, size, dtype=np.uint8)
            for lanes in counts:
                fns = variants(conns, payload, lanes)
                for name, fn in fns.items():  # every variant echoes the payload's bytes
                    if not np.array_equal(np.concatenate([np.frombuffer(v, np.uint8) for v in fn()]), payload):
                        raise AssertionError(f"{name} did not echo the payload")
                times = interleaved(fns, args.repeats, warmup=3)
                rows.append({"bytes": size, "lanes": lanes, "variants": {k: summary(v) for k, v in times.items()}})
                cells = "  ".join(f"{k} {summary(v)['median'] * 1e3:6.2f}" for k, v in times.items())
                print(f"{size >> 20:3d} MiB x{lanes}: {cells}  (ms)", flush=True)
    finally:
        for sock in (s for socks in conns.values() for s in socks):
            sock.close()
        server.stdin.close()
        server.wait(30)
    report = {"machine": machine.describe(), "repeats": args.repeats, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
