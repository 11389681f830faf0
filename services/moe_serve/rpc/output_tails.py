"""RunExperts replies as tail frames (frames.py): the output's bytes travel as the tail, into the caller's buffer.

The server answers `tailed(reply)`: the reply without its output's data (the head) and that data (the
tail), or the whole reply for a caller that did not ask. The caller reads `answer(reply)`: the message,
with its output's data the tail, wherever that landed.
"""

from __future__ import annotations

from moe_client import zerocopy
from moe_serve.rpc.frames import Tailed, TailReply

# Replies smaller than this are read whole: copying a few KiB costs less than the one more read a tail frame
# takes (and a decode call's reply is this small).
LAND_MIN_BYTES = 1 << 16


def tailed(reply) -> tuple[Tailed | list, int]:
    """A zerocopy RunExpertsResponse as what to send (Tailed when its output carries bytes, else its chunks)
    and its size in bytes, whole."""
    whole, size = reply._type.chunks(reply)
    output = reply.output
    if output is None or not len(output.data):  # written to shared memory, or empty: nothing to land anywhere
        return whole, size
    head = zerocopy.RunExpertsResponse(output=output._replace(data=b""), compute_seconds=reply.compute_seconds,
                                       placement_version=reply.placement_version, gpu_event=reply.gpu_event)
    return Tailed(head._type.chunks(head)[0], output.data, whole), size


def answer(reply: memoryview | TailReply):
    """The RunExpertsResponse (views into the frame) of a reply read from the side channel."""
    if not isinstance(reply, TailReply):
        return zerocopy.RunExpertsResponse.FromString(reply)
    message = zerocopy.RunExpertsResponse.FromString(reply.head)
    if message.output is not None:
        message.output = message.output._replace(data=reply.tail)
    return message


def reply_bytes(reply: memoryview | TailReply) -> int:
    """Bytes of a reply as read (for the call metrics)."""
    return len(reply.head) + len(reply.tail) if isinstance(reply, TailReply) else len(reply)
