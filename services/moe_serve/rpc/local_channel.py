"""A same-host channel beside gRPC: length-prefixed frames over a Unix socket, no event loop on either side.

A gRPC unary call between two processes on one host costs ~0.5 ms (two event loops, HTTP/2 framing,
thread hand-offs); a message pair on a Unix socket costs ~15-45 us (`../shared/tools/rpc_floor.py`). A
MoE layer's call to a same-host server carries only its routing (the hidden states and sums travel
in shared memory, shared_regions.py), so the caller's model thread writes a frame and the server's
connection thread reads it, computes and answers: TensorPipe's arrangement for torch RPC, with gRPC
kept for everything else (other hosts, control, health, and the fallback when this channel fails).

The socket lives in the abstract namespace (no file; it is reachable from the server's network
namespace only, so containers with their own network fall back to gRPC by themselves), and a peer is
admitted only if the kernel says it runs as the server's user or root (SO_PEERCRED), and, when the
server has a bearer token, if its first frame carries it.

Frame: u32 payload bytes, u64 sequence number, u8 kind, then the payload. A request's payload is the
caller's serialized message; a reply is OK + the serialized answer, or ERROR + u8 gRPC status code +
the message in UTF-8.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IQB")
HELLO, REQUEST, OK, ERROR = 1, 2, 3, 4
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class ChannelError(Exception):
    """A reply with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ChannelClosed(ConnectionError):
    """The peer went away (or sent something that is not a frame); the channel is unusable."""


def _read_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ChannelClosed("the peer closed the channel")
        got += n
    return buf


def read_frame(sock: socket.socket, max_bytes: int) -> tuple[int, int, bytearray]:
    """(sequence, kind, payload) of the next frame; ChannelClosed at the end or on a frame over max_bytes."""
    size, seq, kind = _HEADER.unpack(_read_exact(sock, _HEADER.size))
    if size > max_bytes:
        raise ChannelClosed(f"a frame of {size} bytes is over the limit of {max_bytes}")
    return seq, kind, _read_exact(sock, size) if size else bytearray()


def write_frame(sock: socket.socket, seq: int, kind: int, payload: bytes | bytearray | memoryview = b"") -> None:
    sock.sendall(_HEADER.pack(len(payload), seq, kind) + bytes(payload))


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


class LocalListener:
    """Accepts same-host callers and answers their frames with `handler(payload) -> reply bytes`.

    `handler` raises ChannelError (or anything with `.code` and `.details`) for a refused call; other
    exceptions answer INTERNAL. Each connection has its own thread; calls on one connection are answered
    in order."""

    def __init__(self, handler: Callable[[bytearray], bytes], token: str | None = None,
                 max_bytes: int = 64 << 20, name: str | None = None):
        self.handler = handler
        self.token = token.encode() if token else None
        self.max_bytes = max_bytes
        self.address = name or f"moe-serve-{os.getpid()}-{secrets.token_hex(6)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.address)
        self._sock.listen(64)
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.calls = 0  # calls answered (tests read it)
        self._thread = threading.Thread(target=self._accept, name="local-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Refuse new calls (UNAVAILABLE to the callers, who fail over) and stop accepting."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # a call being answered still gets its reply

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            uid = peer_uid(conn)
            if uid not in (os.getuid(), 0):
                log.warning("same-host channel: refused a caller running as uid %d", uid)
                conn.close()
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="local-calls", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            seq, kind, payload = read_frame(conn, self.max_bytes)
            if kind != HELLO or (self.token is not None and not hmac.compare_digest(bytes(payload), self.token)):
                _write_error(conn, seq, grpc.StatusCode.UNAUTHENTICATED, "same-host channel: missing or wrong token")
                return
            write_frame(conn, seq, OK)
            while not self._closing:
                seq, kind, payload = read_frame(conn, self.max_bytes)
                if kind != REQUEST:
                    _write_error(conn, seq, grpc.StatusCode.INVALID_ARGUMENT, f"frame kind {kind} is not a request")
                    return
                self._answer(conn, seq, payload)
        except (ChannelClosed, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, seq: int, payload: bytearray) -> None:
        try:
            reply = self.handler(payload)
        except Exception as err:  # the call fails; the connection and the server go on
            code = getattr(err, "code", None)
            code = code() if callable(code) else code
            if not isinstance(code, grpc.StatusCode):
                log.exception("same-host call failed")
                code, details = grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"
            else:
                details = getattr(err, "details", None)
                details = details() if callable(details) else (details or str(err))
            _write_error(conn, seq, code, details)
            return
        self.calls += 1
        write_frame(conn, seq, OK, reply)


def _write_error(conn: socket.socket, seq: int, code: grpc.StatusCode, details: str) -> None:
    write_frame(conn, seq, ERROR, bytes([code.value[0]]) + details.encode())


class LocalLink:
    """The caller's end: `send` a request from any thread, `receive` its reply by sequence number.

    Two threads (two micro-batches) may wait at once: one reads the socket at a time and leaves the
    other's reply for it. A reply nobody waits for any more (its wait timed out) is dropped."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0, max_bytes: int = 64 << 20):
        self.address = address
        self.max_bytes = max_bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect("\0" + address)
            write_frame(self.sock, 0, HELLO, (token or "").encode())
            _seq, kind, payload = read_frame(self.sock, max_bytes)
            if kind != OK:
                raise _error_of(payload)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._expected: set[int] = set()
        self._replies: dict[int, tuple[int, bytearray]] = {}
        self._next = 1
        self.closed = False

    def send(self, payload: bytes) -> int:
        """Send one request; returns its sequence number for `receive`."""
        with self._send_lock:
            if self.closed:
                raise ChannelClosed("the channel is closed")
            seq = self._next
            self._next += 1
            with self._cond:
                self._expected.add(seq)
            try:
                write_frame(self.sock, seq, REQUEST, payload)
            except OSError as err:
                self._fail(err)
                raise ChannelClosed(f"send failed: {err}") from err
        return seq

    def receive(self, seq: int, timeout: float) -> bytearray:
        """The reply's payload; ChannelError for an error reply, TimeoutError after `timeout` s (the reply,
        if it comes later, is dropped), ChannelClosed if the server went away."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    if seq in self._replies:
                        return self._take(seq)
                    if self.closed:
                        self._expected.discard(seq)
                        raise ChannelClosed("the channel closed before the reply came")
                    if not self._reading:
                        self._reading = True
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._expected.discard(seq)
                        raise TimeoutError(f"no reply within {timeout:.3g}s")
                    self._cond.wait(left)  # another thread reads; it hands our reply over
            frame = None
            try:
                frame = self._read(deadline)  # past the deadline: only a frame already there
            finally:
                with self._cond:
                    self._reading = False
                    if frame is not None and frame[0] in self._expected:
                        self._replies[frame[0]] = frame[1:]
                    self._cond.notify_all()
            if frame is None and time.monotonic() >= deadline:
                with self._cond:
                    if seq in self._replies:
                        return self._take(seq)
                    self._expected.discard(seq)
                raise TimeoutError(f"no reply within {timeout:.3g}s")

    def _take(self, seq: int) -> bytearray:
        kind, payload = self._replies.pop(seq)
        self._expected.discard(seq)
        return _reply(kind, payload)

    def _read(self, deadline: float) -> tuple[int, int, bytearray] | None:
        """The next frame, or None if none starts before the deadline. A frame once started is read whole
        (the server writes each in one call), so a timeout never leaves half a frame behind."""
        try:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            return read_frame(self.sock, self.max_bytes)
        except (ChannelClosed, OSError, ValueError) as err:  # ValueError: closed by another thread
            self._fail(err)
            return None

    def _fail(self, err: BaseException) -> None:
        if not self.closed:
            log.warning("same-host channel to %s closed: %s", self.address, err)
        self.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._cond:
            self._cond.notify_all()


def _reply(kind: int, payload: bytearray) -> bytearray:
    if kind == OK:
        return payload
    raise _error_of(payload)


def _error_of(payload: bytearray) -> ChannelError:
    if not payload:
        return ChannelError(grpc.StatusCode.UNKNOWN, "error reply without a status")
    return ChannelError(_CODES.get(payload[0], grpc.StatusCode.UNKNOWN), bytes(payload[1:]).decode(errors="replace"))
