"""Merge concurrent RunExperts calls of the same layer into one bank computation.

The bank computes on one worker thread. Calls that arrive while it is busy queue up; when it frees,
every queued call of the same layer (and the same dtypes) runs as one grouped computation (each
expert once over all their tokens) and each call gets its own rows back. Nothing waits on purpose:
a lone call runs at once, so merging only ever replaces queueing behind each other. Rows are
independent (each is one token's weighted expert sum), so a call's rows are what it alone would get.
Legend: T = tokens, H = hidden size, K = expert slots per token.
"""

from __future__ import annotations

import asyncio
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
class _Call:
    layer: int
    hidden: torch.Tensor  # [T, H]
    expert_ids: torch.Tensor  # [T, K]
    weights: torch.Tensor  # [T, K]
    out_dtype: torch.dtype
    finish: Callable[[torch.Tensor], Any]  # run on the worker thread on this call's [T, H] rows (e.g. encode)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float = 0.0  # time.perf_counter() when queued
    on_device: bool = False  # finish() wants the result where the bank computed it (a GPU), not on the host

    @property
    def key(self) -> tuple:
        """Calls with equal keys can share one computation."""
        return (self.layer, self.out_dtype, self.hidden.dtype, self.hidden.device, self.expert_ids.dtype,
                self.expert_ids.shape[1], self.on_device)


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
        loop = asyncio.get_running_loop()
        call = _Call(layer, hidden, expert_ids, weights, out_dtype, finish, loop, loop.create_future(),
                     time.perf_counter(), on_device)
        with self._lock:
            self._pending.append(call)
            start = not self._draining
            self._draining = True
        if start:
            self.executor.submit(self._drain)
        return await call.future

    def _take(self) -> list[_Call] | None:
        """The oldest queued call and every later one it can merge with, up to max_tokens; None when empty."""
        with self._lock:
            if not self._pending:
                self._draining = False
                return None
            first = self._pending[0]
            if not self.merge:
                self._pending.pop(0)
                return [first]
            group, rest, tokens = [], [], 0
            for call in self._pending:
                if call.key == first.key and (not group or tokens + call.hidden.shape[0] <= self.max_tokens):
                    group.append(call)
                    tokens += call.hidden.shape[0]
                else:
                    rest.append(call)
            self._pending = rest
            return group

    def _drain(self) -> None:
        while (group := self._take()) is not None:
            try:
                results = self._compute(group)
            except Exception as err:  # each call of the group gets the error
                results = [(None, err)] * len(group)
            for call, (value, error) in zip(group, results, strict=True):
                settle_from_thread(call.loop, call.future, value, error)

    def _compute(self, group: list[_Call]) -> list[tuple[Any, BaseException | None]]:
        first = group[0]
        start = time.perf_counter()
        if self.on_wait is not None:
            for call in group:
                self.on_wait(start - call.submitted)
        if len(group) == 1:
            out = self.bank.compute(first.layer, first.hidden, first.expert_ids, first.weights, first.out_dtype,
                                    first.on_device)
            parts = [out]
        else:
            out = self.bank.compute(first.layer, torch.cat([c.hidden for c in group]),
                                    torch.cat([c.expert_ids for c in group]), torch.cat([c.weights for c in group]),
                                    first.out_dtype, first.on_device)
            parts = out.split([c.hidden.shape[0] for c in group])
            self.merged_calls += len(group)
        seconds = time.perf_counter() - start
        self.computations += 1
        # finish() runs here, before the next computation may reuse the bank's output buffer.
        results: list[tuple[Any, BaseException | None]] = []
        for call, part in zip(group, parts, strict=True):
            try:
                results.append(((call.finish(part), seconds), None))
            except Exception as err:  # only this call fails
                results.append((None, err))
        return results
