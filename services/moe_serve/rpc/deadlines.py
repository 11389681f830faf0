"""The deadline of the request being served, carried from the RPC handler into worker threads
(by `moe_serve.process.handoff.ContextThreadPool`)."""

from __future__ import annotations

import time
from contextvars import ContextVar

# time.monotonic() by which the caller wants an answer; None when the caller set no deadline.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("moe_request_deadline", default=None)


def deadline_after(seconds: float | None) -> float | None:
    """A monotonic deadline `seconds` from now (None stays None)."""
    return None if seconds is None else time.monotonic() + seconds


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (may be negative), or None without one."""
    return None if deadline is None else deadline - time.monotonic()
