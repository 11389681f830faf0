"""A split call's pieces sent and read at once: one thread per piece beyond the first.

Moving a piece's bytes over TCP is the kernel copying them on the calling thread (`sendmsg` into the
socket's buffer, `recv_into` out of it), about 3 GB/s for one thread on the lent 16-core host. Pieces
on their own connections sent or read one after another are bound by that one thread; from threads of
their own (the copies release the GIL) they move side by side. The first piece runs on the caller's
thread, so a call of one piece (every call under 2 MiB, every same-host call) takes no thread hand-off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
Outcome = tuple[T | None, BaseException | None]

# Shared by every link of the process. Its tasks never wait on each other, so a full pool only queues
# (two micro-batches x a few servers x 3 extra pieces fit).
_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="side-lanes")


def each(calls: Sequence[Callable[[], T]]) -> list[Outcome]:
    """Run `calls` at once (the first on this thread) and wait for all: (value, None) or (None, error) each."""
    futures = [_POOL.submit(call) for call in calls[1:]]
    outcomes = [_outcome(calls[0])] if calls else []
    for future in futures:
        error = future.exception()
        outcomes.append((None, error) if error is not None else (future.result(), None))
    return outcomes


def values(outcomes: Sequence[Outcome]) -> list:
    """The outcomes' values, in order; the first error raised instead if any call failed."""
    for _, error in outcomes:
        if error is not None:
            raise error
    return [value for value, _ in outcomes]


def _outcome(call: Callable[[], T]) -> Outcome:
    try:
        return call(), None
    except Exception as err:  # handed to the caller with the others
        return None, err
