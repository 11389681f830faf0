"""Free TCP ports."""

from __future__ import annotations

import socket
import threading

# Ports this process has handed out: a process launched on one may take seconds to bind it, and meanwhile the
# kernel would find it free and could hand it out again (a soak run once gave its gateway an expert server's port).
_GIVEN: set[tuple[str, int]] = set()
_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now and that this process has not handed out before
    (another process may still take it)."""
    with _LOCK:
        while True:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if (host, port) not in _GIVEN:
                _GIVEN.add((host, port))
                return port
