"""Handing work to threads and results back to an event loop: the one way every service does both.

Worker threads compute (torch releases the GIL); event loops do I/O. A task submitted to a thread runs
in the submitter's contextvars (the request's id and deadline travel with it), and a result goes back
through the loop's own thread, since asyncio futures and queues are not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ContextThreadPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose tasks run in the submitter's contextvars (request id, deadline).

    loop.run_in_executor does not copy the context (asyncio.to_thread does, but only onto the default pool);
    it calls submit() on the loop's thread, so this copies the awaiting request's context.
    """

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


def settle_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any = None,
                       error: BaseException | None = None) -> bool:
    """From a worker thread: complete `future` (owned by `loop`) with `result` or `error`.

    A future already done (its caller was cancelled) is left alone. False when the loop has closed, i.e.
    nobody is waiting any more.
    """
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the event loop has closed
        return False
    return True


def put_from_thread(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> bool:
    """From a worker thread: put `item` on an unbounded asyncio `queue` of `loop`; False when the loop has
    closed (nobody is listening any more)."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        return False
    return True


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


