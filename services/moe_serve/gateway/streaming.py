"""Run a blocking iterator on a worker thread and consume it from the event loop as items come."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

from moe_serve.process.handoff import put_from_thread

T = TypeVar("T")
_END = object()


async def iterate_in_thread(executor: Executor, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Yield what `make()` yields, computed on `executor`; an error there is raised here.

    When the consumer stops early (the client cancelled), the worker stops after its current item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        if not put_from_thread(loop, queue, item):  # the loop has closed: nobody is listening any more
            stop.set()

    def pump() -> None:
        try:
            for item in make():
                put(item)
                if stop.is_set():
                    break
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)
        finally:
            put(_END)

    loop.run_in_executor(executor, pump)  # never raises: errors travel through the queue
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the worker ends after its current item; nothing waits for it
