"""Merge concurrent RunExperts calls of the same layer into one bank computation.

The bank computes on one worker thread. Calls that arrive while it is busy queue up; when it frees,
every queued call of the same layer (and the same dtypes) runs as one grouped computation (each
expert once over all their tokens) and each call gets its own rows back. Nothing waits on purpose:
a lone call runs at once, so merging only ever replaces queueing behind each other. Rows are
independent (each is one token's weighted expert sum), so a call's rows are what it alone would get.

A call may come as a `prepare` function (decode and check a request) that the worker runs before the
call can join a group: then the event loop only moves bytes, and every touch of the bank's devices
(reading a caller's GPU memory, checking it for NaN) happens on the worker, under the bank's lock, so
nothing runs beside a CUDA graph capture. The same-host channel (side_calls.py) takes that lock too.
Legend: T = tokens, H = hidden size, K = expert slots per token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from moe_serve.expert_server.bank import ExpertBank
from moe_serve.process.handoff import settle_from_thread


@dataclass
class Work:
    """What one call computes: prepared from a request on the worker, or given as is."""

    layer: int
    hidden: torch.Tensor  # [T, H]
    expert_ids: torch.Tensor  # [T, K]
    weights: torch.Tensor  # [T, K]
    out_dtype: torch.dtype
    finish: Callable[[torch.Tensor], Any]  # run on the worker thread on this call's [T, H] rows (e.g. encode)
    on_device: bool = False  # finish() wants the result where the bank computed it (a GPU), not on the host
    reply_event: bytes = b""  # a device-routed call's reply names this event (rpc/gpu_events.py): no host wait


@dataclass
class _Call:
    work: Work | None  # None until `prepare` has run on the worker
    prepare: Callable[[], Work] | None
    loop: asyncio.AbstractEventLoop | None  # None: a thread waits on `future` (run_blocking)
    future: asyncio.Future | concurrent.futures.Future
    submitted: float = 0.0  # time.perf_counter() when queued

    def settle(self, value: Any, error: BaseException | None) -> None:
        """From the worker: the call's result (or error) to whoever waits for it."""
        if self.loop is not None:
            settle_from_thread(self.loop, self.future, value, error)
        elif not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

    @property
    def key(self) -> tuple:
        """Calls with equal keys can share one computation."""
        w = self.work
        return (w.layer, w.out_dtype, w.hidden.dtype, w.hidden.device, w.expert_ids.dtype, w.expert_ids.shape[1],
                w.on_device)


class CallMerger:
    """Runs RunExperts computations on `executor` (one thread), merging the calls that queued meanwhile."""

    def __init__(self, bank: ExpertBank, executor: Executor, merge: bool = True, max_tokens: int = 16384,
                 on_wait: Callable[[float], None] | None = None):
        self.bank = bank
        self.executor = executor
        self.merge = merge  # False: the same queue, one call per computation (the comparison baseline)
        self.max_tokens = max_tokens  # tokens per merged computation; more calls wait for the next one
        self.on_wait = on_wait  # called with each call's seconds in the queue (metrics)
        self._pending: list[_Call] = []
        self._lock = threading.Lock()
        self._draining = False
        self.computations = 0  # bank computations run (tests and benchmarks read it)
        self.merged_calls = 0  # calls that shared a computation with another

    async def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                  out_dtype: torch.dtype, finish: Callable[[torch.Tensor], Any],
                  on_device: bool = False) -> tuple[Any, float]:
        """finish(this call's [T, H] output) and the seconds of the computation it was part of; with
        `on_device` the output stays on the bank's first GPU (finish copies it where it is wanted)."""
        value, seconds, _ = await self.run_prepared(
            None, Work(layer, hidden, expert_ids, weights, out_dtype, finish, on_device))
        return value, seconds

    async def run_prepared(self, prepare: Callable[[], Work] | None,
                           work: Work | None = None) -> tuple[Any, float, Work]:
        """As `run`, for the Work that `prepare()` makes on the worker (its errors are the call's); returns
        finish's value, the computation's seconds, and the Work."""
        loop = asyncio.get_running_loop()
        call = _Call(work, prepare, loop, loop.create_future(), time.perf_counter())
        self._queue(call)
        return await call.future

    def run_blocking(self, prepare: Callable[[], Work]) -> tuple[Any, float, Work]:
        """As `run_prepared`, from a thread with no event loop (a side-channel connection's), waiting on it."""
        call = _Call(None, prepare, None, concurrent.futures.Future(), time.perf_counter())
        self._queue(call)
        return call.future.result()

    def _queue(self, call: _Call) -> None:
        with self._lock:
            self._pending.append(call)
            start = not self._draining
            self._draining = True
        if start:
            self.executor.submit(self._drain)

    def _take(self) -> list[_Call] | None:
        """The oldest prepared call and every later one it can merge with, up to max_tokens; None when the
        queue is empty, [] when its calls still need preparing."""
        with self._lock:
            if not self._pending:
                self._draining = False
                return None
            ready = [c for c in self._pending if c.work is not None]
            if not ready:
                return []
            first = ready[0]
            if not self.merge:
                self._pending.remove(first)
                return [first]
            group, rest, tokens = [], [], 0
            for call in self._pending:
                size = call.work.hidden.shape[0] if call.work is not None else 0
                if call.work is not None and call.key == first.key and (not group or tokens + size <= self.max_tokens):
                    group.append(call)
                    tokens += size
                else:
                    rest.append(call)
            self._pending = rest
            return group

    def _prepare_pending(self) -> None:
        """Run `prepare` of every queued call that has one; a call whose request is bad fails alone."""
        with self._lock:
            todo = [c for c in self._pending if c.work is None]
        failed = []
        for call in todo:
            prepare, call.prepare = call.prepare, None  # the request's bytes go as soon as it is decoded
            try:
                call.work = prepare()
            except Exception as err:
                # Without its traceback: that would hold this frame, and with it the refused request's
                # buffers, in a reference cycle until a garbage collection (issue 15: refused requests).
                failed.append((call, err.with_traceback(None)))
            del prepare
        if failed:
            with self._lock:
                self._pending = [c for c in self._pending if all(c is not f for f, _ in failed)]
            for call, err in failed:
                call.settle(None, err)

    def _drain(self) -> None:
        while True:
            with self.bank.lock:  # the bank's devices are ours from decoding to the reply's bytes
                self._prepare_pending()
                group = self._take()
                if group is None:
                    return
                if not group:
                    continue
                try:
                    results = self._compute(group)
                except Exception as err:  # each call of the group gets the error
                    results = [(None, err)] * len(group)
            for call, (value, error) in zip(group, results, strict=True):
                call.settle(value, error)

    def _compute(self, group: list[_Call]) -> list[tuple[Any, BaseException | None]]:
        first = group[0].work
        works = [c.work for c in group]
        start = time.perf_counter()
        if self.on_wait is not None:
            for call in group:
                self.on_wait(start - call.submitted)
        if len(group) == 1:
            out = self.bank.compute(first.layer, first.hidden, first.expert_ids, first.weights, first.out_dtype,
                                    first.on_device)
            parts = [out]
        else:
            out = self.bank.compute(first.layer, torch.cat([w.hidden for w in works]),
                                    torch.cat([w.expert_ids for w in works]), torch.cat([w.weights for w in works]),
                                    first.out_dtype, first.on_device)
            parts = out.split([w.hidden.shape[0] for w in works])
            self.merged_calls += len(group)
        seconds = time.perf_counter() - start
        self.computations += 1
        # finish() runs here, before the next computation may reuse the bank's output buffer.
        results: list[tuple[Any, BaseException | None]] = []
        for work, part in zip(works, parts, strict=True):
            try:
                results.append(((work.finish(part), seconds, work), None))
            except Exception as err:  # only this call fails
                results.append((None, err))
        return results
