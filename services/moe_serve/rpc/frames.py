"""The side channel's frames (rpc/side_channel.py): length-prefixed, written from their own buffers, read in place.

Frame: u32 payload bytes, u64 sequence number, u8 kind, then the payload. A request's payload is the
caller's serialized message; a reply is OK + the serialized answer, or ERROR + u8 gRPC status code +
the message in UTF-8.

Tail frames: a RunExperts reply over TCP is a message around one large byte string, the output's data.
Read as one frame it lands in a fresh buffer, and a call split over several links lands in several,
which the caller then copies into one tensor. A tail frame carries the message without that string (the
head) and the string after it (the tail): the caller, which knows how large the tail will be, names
where it goes when it sends the request (REQUEST_TAIL), and the reader receives it there, so a split
call's pieces land side by side in one tensor with no copy beyond the kernel's. OK_TAIL's payload is
u32 head bytes, the head, the tail. A listener that offers them says so in its answer to HELLO (OFFER);
a caller sends REQUEST_TAIL only to one that did, and a reply goes as a tail frame only to REQUEST_TAIL.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

HEADER = struct.Struct("<IQB")
HELLO, REQUEST, OK, ERROR, REQUEST_TAIL, OK_TAIL = 1, 2, 3, 4, 5, 6
OFFER = b"tail"  # a listener's answer to HELLO when it sends tail frames
_HEAD = struct.Struct("<I")
_PREFIX = 512  # bytes of a tail frame read first: its head's length, its head (~30 bytes for RunExperts), and more
_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
_SMALL = 1 << 16  # payloads below this are read into a bytearray; larger ones into uninitialised memory
Payload = bytes | bytearray | memoryview | list  # a list: pieces sent in order, as one payload


class ChannelClosed(ConnectionError):
    """The peer went away (or sent something that is not a frame); the channel is unusable."""


class Tailed(NamedTuple):
    """A handler's reply that may go as a tail frame: `head` (the message without its bulk), `tail` (the bulk),
    and `whole` (the message with it), sent to a caller that did not ask for a tail."""

    head: Payload
    tail: memoryview
    whole: Payload


class TailReply(NamedTuple):
    """A tail frame as read: the head's bytes, and the tail, in the caller's buffer when `landed`."""

    head: memoryview
    tail: memoryview
    landed: bool


def _fill(sock: socket.socket, view: memoryview) -> memoryview:
    # A large read waits for all of it in one call (MSG_WAITALL) where the socket blocks: each return from recv
    # takes the GIL back, which the threads of a split call's other pieces are contending for.
    flags = socket.MSG_WAITALL if view.nbytes >= _SMALL and sock.gettimeout() is None else 0
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:], 0, flags)
        if n == 0:
            raise ChannelClosed("the peer closed the channel")
        got += n
    return view


def _read_exact(sock: socket.socket, size: int) -> memoryview:
    # A large payload goes into malloc'd memory, not a bytearray: no zero-fill, and no fresh pages to fault
    # in once malloc keeps large blocks (process.malloc.keep_large_buffers).
    return _fill(sock, memoryview(bytearray(size) if size < _SMALL else np.empty(size, np.uint8).data))


def read_frame(sock: socket.socket, max_bytes: int,
               claim: Callable[[int, int], memoryview | None] | None = None) -> tuple[int, int, memoryview | TailReply]:
    """(sequence, kind, payload) of the next frame; ChannelClosed at the end or on a frame over max_bytes.

    With `claim` (a caller's reader), an OK_TAIL frame's payload is a TailReply: its tail goes into
    `claim(sequence, tail bytes)`'s buffer, or into a fresh one when that gives None."""
    size, seq, kind = HEADER.unpack(_read_exact(sock, HEADER.size))
    if size > max_bytes:
        raise ChannelClosed(f"a frame of {size} bytes is over the limit of {max_bytes}")
    if kind != OK_TAIL or claim is None:
        return seq, kind, _read_exact(sock, size)
    # The head's length, the head and the tail's first bytes in one read (the tail's first bytes then copied
    # to where it lands): a piece of a split call takes as many reads as a whole frame's, plus this one.
    prefix = _read_exact(sock, min(size, _PREFIX))
    if len(prefix) < _HEAD.size:
        raise ChannelClosed(f"a tail frame of {size} bytes has no head length")
    (head_bytes,) = _HEAD.unpack(prefix[:_HEAD.size])
    if head_bytes > size - _HEAD.size:
        raise ChannelClosed(f"a tail frame of {size} bytes says its head is {head_bytes}")
    head_end = _HEAD.size + head_bytes
    head = prefix[_HEAD.size:head_end]
    if head_end > len(prefix):  # a head longer than the prefix: the rest of it
        head = memoryview(bytes(head) + bytes(_read_exact(sock, head_end - len(prefix))))
    tail_bytes = size - head_end
    into = claim(seq, tail_bytes)
    tail = into if into is not None else memoryview(np.empty(tail_bytes, np.uint8).data)
    early = prefix[head_end:]  # the tail's bytes read with the head
    tail[:len(early)] = early
    _fill(sock, tail[len(early):])
    return seq, kind, TailReply(head, tail, into is not None)


def write_frame(sock: socket.socket, seq: int, kind: int, payload: Payload = b"") -> None:
    """One frame; a list payload is its pieces in order, each sent from its own buffer (sendmsg, no join)."""
    pieces = [memoryview(p).cast("B") for p in (payload if isinstance(payload, list) else [payload])]
    size = sum(p.nbytes for p in pieces)
    _send_all(sock, [memoryview(HEADER.pack(size, seq, kind)), *(p for p in pieces if p.nbytes)])


def write_tail_frame(sock: socket.socket, seq: int, reply: Tailed) -> None:
    """`reply` as an OK_TAIL frame: its head's length, its head, its tail."""
    head = reply.head if isinstance(reply.head, list) else [reply.head]
    head_bytes = sum(memoryview(p).nbytes for p in head)
    write_frame(sock, seq, OK_TAIL, [_HEAD.pack(head_bytes), *head, reply.tail])


def _send_all(sock: socket.socket, views: list[memoryview]) -> None:
    """sendmsg until every byte of `views` is sent (a blocking socket may take part of them at a time)."""
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
