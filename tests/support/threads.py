"""Threads for blocking code that talks to asyncio servers or runs calls side by side."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor


class LoopThread:
    """An asyncio loop on its own thread, so blocking code can run coroutines on it (aio servers it hosts,
    a gateway's event loop where its gRPC calls run)."""

    def __init__(self, name: str = "aio-loop", timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the loop from another thread and return its result (default timeout: the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def concurrently(fn, items: list) -> list:
    """fn(item) for every item at once, one thread each; results in order."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))
