"""The id of the request being served, carried in a context variable so that every log line shows it.

The gateway takes it from ForwardRequest.request_id (or makes one), passes it to the expert servers in
RunExpertsRequest.request_id, and they log under the same id: one grep follows a request across hosts.
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar

NONE = "-"
_current: ContextVar[str] = ContextVar("moe_request_id", default=NONE)


def current() -> str:
    """The id of the request this code runs for, or '-' outside any request."""
    return _current.get()


def new() -> str:
    """A fresh id (16 hex digits), for requests that arrive without one."""
    return uuid.uuid4().hex[:16]


def bind(request_id: str):
    """Make `request_id` current until `unbind(token)`; returns the token."""
    return _current.set(request_id or NONE)


def unbind(token) -> None:
    """Restore the id that was current before `bind`."""
    _current.reset(token)


def joined(ids: list[str], most: int = 4) -> str:
    """One id for a batch that serves several requests: 'a,b,c' (the first `most`, then '+N')."""
    unique = list(dict.fromkeys(i for i in ids if i and i != NONE))
    text = ",".join(unique[:most])
    return text + (f"+{len(unique) - most}" if len(unique) > most else "") or NONE


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record, so formats can print %(request_id)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        return True
