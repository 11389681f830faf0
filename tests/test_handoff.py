"""Work handed to threads runs in the caller's contextvars; results come back through the loop's thread."""

import asyncio
import threading
from contextvars import ContextVar

import pytest

from moe_serve.process.handoff import ContextThreadPool, put_from_thread, settle_from_thread

REQUEST: ContextVar[str] = ContextVar("request", default="-")


def test_tasks_run_in_the_submitters_context():
    with ContextThreadPool(max_workers=1) as pool:
        REQUEST.set("abc")
        assert pool.submit(REQUEST.get).result() == "abc"
        REQUEST.set("def")  # a later submit sees the later value; the worker thread is the same
        assert pool.submit(REQUEST.get).result() == "def"


def test_run_in_executor_carries_the_awaiting_tasks_context():
    async def main():
        REQUEST.set("from-the-loop")
        with ContextThreadPool(max_workers=1) as pool:
            return await asyncio.get_running_loop().run_in_executor(pool, REQUEST.get)

    assert asyncio.run(main()) == "from-the-loop"


def _from_thread(fn) -> None:
    worker = threading.Thread(target=fn)
    worker.start()
    worker.join()


@pytest.mark.parametrize("error", [None, ValueError("bad")])
def test_a_result_or_an_error_reaches_the_awaiting_future(error):
    async def main():
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        _from_thread(lambda: settle_from_thread(loop, future, "value", error))
        return await future

    if error is None:
        assert asyncio.run(main()) == "value"
    else:
        with pytest.raises(ValueError, match="bad"):
            asyncio.run(main())


def test_a_cancelled_future_is_left_alone():
    async def main():
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.cancel()
        _from_thread(lambda: settle_from_thread(loop, future, "late"))
        await asyncio.sleep(0)  # the loop runs the settle: it must not raise InvalidStateError
        return future.cancelled()

    assert asyncio.run(main())


def test_items_reach_the_queue_in_order_and_a_closed_loop_says_so():
    async def main():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        _from_thread(lambda: [put_from_thread(loop, queue, i) for i in range(5)])
        return [await queue.get() for _ in range(5)], loop, queue

    items, loop, queue = asyncio.run(main())
    assert items == list(range(5))
    assert put_from_thread(loop, queue, "after close") is False
    future = asyncio.Future(loop=loop)
    assert settle_from_thread(loop, future, "after close") is False
