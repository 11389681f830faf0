"""A channel beside gRPC for RunExperts: length-prefixed frames over a socket, no event loop on either side.

A gRPC unary call between two processes on one host costs ~0.5 ms (two event loops, HTTP/2 framing,
thread hand-offs); a message pair on a Unix socket costs ~15-45 us (`../shared/tools/rpc_floor.py`).
And gRPC's Python stack copies a large message several times on each side, so a RunExperts of a few
MiB over TCP moved at a fraction of the link's rate. Here the caller's model thread writes a frame
and the server's connection thread reads it, computes and answers: TensorPipe's arrangement for
torch RPC, with gRPC kept for everything else (control, health, and the fallback when a call over
this channel fails).

Two kinds of socket:
- same host: a Unix socket in the abstract namespace (no file; reachable from the server's network
  namespace only, so containers with their own network fall back by themselves), admitted only if
  the kernel says the peer runs as the server's user or root (SO_PEERCRED). A call carries only its
  routing: the hidden states and sums travel in shared memory (shared_regions.py).
- other hosts: TCP. A call carries the tensors' bytes, written from their own buffers in one
  sendmsg and read with recv_into into one buffer that the request is parsed from in place
  (zerocopy): no copy in user space on either side beyond the kernel's.
Either way, when the server has a bearer token the caller's first frame must carry it.

The frames, and the tail frames that put a reply's bulk straight into the caller's buffer, are in frames.py.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

import grpc

from moe_serve.rpc.frames import (
    ERROR,
    HELLO,
    OFFER,
    OK,
    OK_TAIL,
    REQUEST,
    REQUEST_TAIL,
    ChannelClosed,
    Payload,
    Tailed,
    TailReply,
    read_frame,
    write_frame,
    write_tail_frame,
)

__all__ = ["ChannelClosed", "ChannelError", "SideLink", "SideListener", "TailReply", "Tailed"]

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_SLICE = 0.02  # s: the longest one thread waits in select while others wait for the socket (receive_dated)
_HELLO_MAX = 4096  # bytes of the first frame (the token): nothing larger is read before a caller is admitted


class ChannelError(Exception):
    """A reply with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


class SideListener:
    """Accepts callers and answers their frames with `handler(payload) -> reply payload`.

    Same-host callers on an abstract Unix socket (the default), or any host's on TCP (`tcp=(host, port)`,
    port 0 picks one). `handler` raises ChannelError (or anything with `.code` and `.details`) for a refused
    call; other exceptions answer INTERNAL. It may answer a Tailed reply: a tail frame to callers that ask
    for one (frames.py; offered unless `tails` is False), the whole message to the others. Each connection
    has its own thread; calls on one connection are answered in order."""

    def __init__(self, handler: Callable[[memoryview], Payload | Tailed], token: str | None = None,
                 max_bytes: int = 64 << 20, name: str | None = None, tcp: tuple[str, int] | None = None,
                 max_connections: int = 256, hello_timeout: float = 10.0, tails: bool = True):
        self.handler = handler
        self.tails = tails
        # A caller that connects and says nothing, or too many connections, must not hold threads: each
        # connection has one, so both are bounded (the first frame, the token, is read within hello_timeout
        # and may be at most _HELLO_MAX bytes).
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self.token = token.encode() if token else None
        self.max_bytes = max_bytes
        self.tcp = tcp is not None
        if tcp is None:
            self.address = name or f"moe-serve-{os.getpid()}-{secrets.token_hex(6)}"
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind("\0" + self.address)
            self._sock.listen(64)
        else:  # create_server: SO_REUSEADDR, never SO_REUSEPORT (two servers on one port would split callers)
            host, port = tcp
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, port), family=family, backlog=64)
            self.address = f"{host}:{self._sock.getsockname()[1]}"
        self.port = self._sock.getsockname()[1] if self.tcp else 0
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.calls = 0  # calls answered (tests read it)
        self._thread = threading.Thread(target=self._accept, name="side-accept", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let each connection finish the call it is answering (its caller gets the reply),
        then close them: the callers' next calls fail over. Waits up to `timeout` s for those calls, so the
        process never exits with a connection thread inside a computation."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # a call being answered still gets its reply
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= self.max_connections
            if full:
                log.warning("side channel %s: %d connections already; refused another", self.address,
                            self.max_connections)
                conn.close()
                continue
            if self.tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a reply's last bytes go at once
                _keepalive(conn, 10)  # a caller that vanished (a cut link) frees its thread within ~30 s
            else:
                uid = peer_uid(conn)
                if uid not in (os.getuid(), 0):
                    log.warning("same-host channel: refused a caller running as uid %d", uid)
                    conn.close()
                    continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="side-calls", daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.hello_timeout)
            seq, kind, payload = read_frame(conn, _HELLO_MAX)
            if kind != HELLO or (self.token is not None and not hmac.compare_digest(bytes(payload), self.token)):
                _write_error(conn, seq, grpc.StatusCode.UNAUTHENTICATED, "side channel: missing or wrong token")
                return
            conn.settimeout(None)
            write_frame(conn, seq, OK, OFFER if self.tails else b"")
            requests = (REQUEST, REQUEST_TAIL) if self.tails else (REQUEST,)
            while not self._closing:
                seq, kind, payload = read_frame(conn, self.max_bytes)
                if kind not in requests:
                    _write_error(conn, seq, grpc.StatusCode.INVALID_ARGUMENT, f"frame kind {kind} is not a request")
                    return
                self._answer(conn, seq, payload, kind == REQUEST_TAIL)
        except (ChannelClosed, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _answer(self, conn: socket.socket, seq: int, payload: memoryview, tail: bool) -> None:
        try:
            reply = self.handler(payload)
        except Exception as err:  # the call fails; the connection and the server go on
            code = getattr(err, "code", None)
            code = code() if callable(code) else code
            if not isinstance(code, grpc.StatusCode):
                log.exception("side-channel call failed")
                code, details = grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"
            else:
                details = getattr(err, "details", None)
                details = details() if callable(details) else (details or str(err))
            _write_error(conn, seq, code, details)
            return
        self.calls += 1
        if not isinstance(reply, Tailed):
            write_frame(conn, seq, OK, reply)
        elif tail:
            write_tail_frame(conn, seq, reply)
        else:
            write_frame(conn, seq, OK, reply.whole)


def _write_error(conn: socket.socket, seq: int, code: grpc.StatusCode, details: str) -> None:
    write_frame(conn, seq, ERROR, bytes([code.value[0]]) + details.encode())


class SideLink:
    """The caller's end: `send` a request from any thread, `receive` its reply by sequence number.

    `address`: the server's abstract Unix socket name, or "host:port" of its TCP listener with `tcp=True`
    (then TCP keepalive probes every `keepalive` s find a peer that vanished without closing).
    Two threads (two micro-batches) may wait at once: one reads the socket at a time and leaves the
    other's reply for it. A reply nobody waits for any more (its wait timed out) is dropped."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0, max_bytes: int = 64 << 20,
                 tcp: bool = False, keepalive: float = 10.0):
        self.address = address
        self.tcp = tcp
        self.max_bytes = max_bytes
        try:
            self.sock = _connect_tcp(address, timeout, keepalive) if tcp else _connect_unix(address, timeout)
        except OSError as err:
            raise ChannelClosed(f"cannot connect to {address}: {err}") from err
        try:
            write_frame(self.sock, 0, HELLO, (token or "").encode())
            _seq, kind, payload = read_frame(self.sock, max_bytes)
            if kind != OK:
                raise _error_of(payload)
            self.tails = bytes(payload) == OFFER  # the server sends tail frames when asked (frames.py)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        # A send never waits for room in the socket's buffer longer than `timeout` (or its own): a peer that
        # stopped reading, or a link that went silent, fails the call (and the link) instead of holding the caller.
        self.timeout = timeout
        self._send_timeout = -1.0
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._expected: set[int] = set()
        self._into: dict[int, memoryview] = {}  # where a tail reply's bulk goes, by sequence number
        self._replies: dict[int, tuple[int, memoryview | TailReply, float]] = {}
        self._empty_at = 0.0  # time.monotonic() when a read last found nothing in the socket
        self._next = 1
        self.closed = False

    def send(self, payload: Payload, timeout: float | None = None, into: memoryview | None = None) -> int:
        """Send one request, waiting at most `timeout` s (default: the link's) for room in the socket's buffer
        at a time; returns its sequence number for `receive`. ChannelClosed (the link closed) if it fails.

        `into`: where the reply's bulk should land, if the server sends tail frames (`tails`): the reply is then
        a TailReply whose tail is `into` when it was just that size (else a fresh buffer). Nothing is written
        there once the reply is taken, or once the call is forgotten or given up on before its reply starts to
        be read (a wait never ends in the middle of that read; `forget` from another thread may): so a buffer
        is not reused for anything else until its reply was taken (the gateway gives each call a new one)."""
        tail = into is not None and self.tails
        with self._send_lock:
            if self.closed:
                raise ChannelClosed("the channel is closed")
            seq = self._next
            self._next += 1
            with self._cond:
                self._expected.add(seq)
                if tail:
                    self._into[seq] = into
            try:
                self._limit_sends(self.timeout if timeout is None else timeout)
                write_frame(self.sock, seq, REQUEST_TAIL if tail else REQUEST, payload)
            except OSError as err:
                self._fail(err)
                raise ChannelClosed(f"send failed: {err}") from err
        return seq

    def _limit_sends(self, seconds: float) -> None:
        # A call's budget left is a new float every call: set to the largest of 2**(k/4) s not above it (at most
        # 16% shorter), calls with like budgets share one setting instead of a system call each (1497 of 1500 did).
        seconds = 2.0 ** (math.floor(math.log2(max(seconds, 0.001)) * 4) / 4)  # 0 would mean no limit
        if seconds != self._send_timeout:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
            self._send_timeout = seconds

    def receive(self, seq: int, timeout: float) -> memoryview | TailReply:
        """The reply's payload; ChannelError for an error reply, TimeoutError after `timeout` s (the reply,
        if it comes later, is dropped), ChannelClosed if the server went away."""
        return self.receive_dated(seq, timeout)[0]

    def receive_dated(self, seq: int, timeout: float) -> tuple[memoryview | TailReply, float]:
        """As `receive`, with when the reply came (time.perf_counter()), or 0.0 when that is not known.

        A reply is dated only when a thread was waiting in `select` as it came; one found already in the
        socket came at some unknown time before (while the caller computed, or waited on another server),
        and dating a call by when it was read would make it look slow (call_budget.py learns from these).

        Threads share the socket: one reads at a time and hands the others their replies. A reader waits
        at most _SLICE in `select` before letting go, and a thread past its deadline gives up only once a
        look at the socket made after that deadline found it empty: a reply that came in time is never
        lost because another thread held the socket (two micro-batches past their budgets at once)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    if seq in self._replies:
                        return self._take(seq)
                    if self.closed:
                        self._drop(seq)
                        raise ChannelClosed("the channel closed before the reply came")
                    if self._empty_at >= deadline:
                        self._drop(seq)
                        raise TimeoutError(f"no reply within {timeout:.3g}s")
                    if not self._reading:
                        self._reading = True
                        break
                    self._cond.wait(max(deadline - time.monotonic(), _SLICE))  # the reader notifies
            frame = empty = None
            try:
                frame, empty = self._read(min(deadline, time.monotonic() + _SLICE))
            finally:
                self._done_reading(frame, empty)

    def poll(self) -> None:
        """Read the replies already in the socket, without waiting, unless another thread is reading: a watcher
        (gateway/pipelined_calls.py) learns of error replies and of a peer gone while the callers are busy."""
        while True:
            with self._cond:
                if self._reading or self.closed:
                    return
                self._reading = True
            frame = empty = None
            try:
                frame, empty = self._read(time.monotonic())
            finally:
                self._done_reading(frame, empty)
            if frame is None:
                return

    def failed(self, seq: int) -> bool:
        """Whether `seq`'s reply, as far as read, is an error, or the channel closed before it came."""
        with self._cond:
            reply = self._replies.get(seq)
            return reply[0] == ERROR if reply is not None else self.closed

    def replied(self, seq: int) -> bool:
        """Whether `seq`'s reply has been read (kept for its caller)."""
        with self._cond:
            return seq in self._replies

    def _done_reading(self, frame, empty: float | None) -> None:
        with self._cond:
            self._reading = False
            if empty is not None:
                self._empty_at = empty
            if frame is not None and frame[0] in self._expected:
                self._replies[frame[0]] = frame[1:]
            self._cond.notify_all()

    def forget(self, seq: int) -> None:
        """Nobody will wait for `seq`'s reply: drop it, now or when it comes."""
        with self._cond:
            self._drop(seq)
            self._replies.pop(seq, None)

    def _drop(self, seq: int) -> None:  # under self._cond
        self._expected.discard(seq)
        self._into.pop(seq, None)

    def _claim(self, seq: int, size: int) -> memoryview | None:
        """The buffer a tail of `size` bytes for `seq` goes into, if its caller gave one of that size and still
        waits for it; claimed once, by the reader, which then fills it outside the lock."""
        with self._cond:
            into = self._into.pop(seq, None)
        return into if into is not None and into.nbytes == size else None

    def _take(self, seq: int) -> tuple[memoryview | TailReply, float]:
        kind, payload, arrived = self._replies.pop(seq)
        self._drop(seq)
        return _reply(kind, payload), arrived

    def _read(self, until: float) -> tuple[tuple[int, int, memoryview, float] | None, float | None]:
        """(the next frame as (seq, kind, payload, when it came or 0.0), None) if one starts before `until`;
        (None, when the socket was found empty) if none does; (None, None) if the channel failed. A frame once
        started is read whole (the server writes each in one call), so no wait leaves half a frame behind."""
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)  # already there: it came at an unknown time
            arrived = 0.0
            if not ready:
                ready, _, _ = select.select([self.sock], [], [], max(0.0, until - time.monotonic()))
                if not ready:
                    return None, time.monotonic()
                arrived = time.perf_counter()
            seq, kind, payload = read_frame(self.sock, self.max_bytes, self._claim)
            return (seq, kind, payload, arrived), None
        except (ChannelClosed, OSError, ValueError) as err:  # ValueError: closed by another thread
            self._fail(err)
            return None, None

    def _fail(self, err: BaseException) -> None:
        if not self.closed:
            log.warning("side channel to %s closed: %s", self.address, err)
        self.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._cond:
            self._into.clear()  # nothing lands anywhere any more
            self._cond.notify_all()


def _connect_unix(name: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_tcp(address: str, timeout: float, keepalive: float) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _keepalive(sock, keepalive)
    return sock


def _keepalive(sock: socket.socket, seconds: float) -> None:
    """Probe an idle connection every `seconds`; two missed probes, or data unacknowledged for three times
    that (keepalive only probes an idle line), end it."""
    idle = max(1, int(seconds))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 3 * idle * 1000)


def _reply(kind: int, payload: memoryview | TailReply) -> memoryview | TailReply:
    if kind in (OK, OK_TAIL):
        return payload
    raise _error_of(payload)


def _error_of(payload: memoryview) -> ChannelError:
    if not payload:
        return ChannelError(grpc.StatusCode.UNKNOWN, "error reply without a status")
    return ChannelError(_CODES.get(payload[0], grpc.StatusCode.UNKNOWN), bytes(payload[1:]).decode(errors="replace"))
