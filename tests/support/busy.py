"""Keep an expert server's devices busy, so that its RunExperts calls wait, over gRPC or the same-host channel."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def bank_held(servicer) -> Iterator[None]:
    """Hold the server's bank lock (every computation takes it) from another thread until the block ends."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with servicer.bank.lock:
            held.set()
            release.wait(120)

    thread = threading.Thread(target=hold, name="bank-held", daemon=True)
    thread.start()
    held.wait(30)
    try:
        yield
    finally:
        release.set()
        thread.join(30)
