"""The deadline of the request being served, carried from the RPC handler into worker threads."""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar

# time.monotonic() by which the caller wants an answer; None when the caller set no deadline.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("moe_request_deadline", default=None)


def deadline_after(seconds: float | None) -> float | None:
    """A monotonic deadline `seconds` from now (None stays None)."""
    return None if seconds is None else time.monotonic() + seconds


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (may be negative), or None without one."""
    return None if deadline is None else deadline - time.monotonic()


class ContextThreadPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose tasks run in the submitter's contextvars, so they see the request deadline.

    loop.run_in_executor does not copy the context (asyncio.to_thread does, but only onto the default pool).
    """

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)
