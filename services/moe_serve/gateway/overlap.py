"""Overlap expert calls with dense work: routed experts started without waiting, and two micro-batches
that take turns on the dense layers (the ping-pong of attention/expert disaggregation, MegaScale-Infer).

Each micro-batch runs through every layer on its own thread. One lock stands for "computing dense
layers here": a micro-batch holds it while it computes and lets go only while it waits on its
RunExperts calls, so the other computes meanwhile and the two never compete for the cores. Within a
micro-batch, `submit` starts a layer's expert calls and the shared experts run before the wait
(core.decoder.moe_block). Micro-batches hold different sequences (or, for simple_moe, different
tokens), so the results are those of one batch: only GEMM shapes change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

import torch

from moe_serve.core.experts import ExpertBackend
from moe_serve.process.handoff import ContextThreadPool

T = TypeVar("T")
Part = Callable[[ExpertBackend], T]


class AsyncExperts:
    """An ExpertBackend with `submit`: a dispatcher's calls start on its event loop and run while we compute."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, hidden, expert_ids, weights).result()

    def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Future:
        """Start the layer's routed experts; the future holds the [T, H] float32 sum.

        The backend's own `submit` (the gRPC dispatcher's) decides where the tensors start from: dense
        layers on a GPU keep the hidden states there for servers that map its memory (CUDA IPC)."""
        own = getattr(self.inner, "submit", None)
        if own is not None:  # the backend starts its calls itself
            return own(layer, hidden, expert_ids, weights)
        done: Future = Future()  # an in-process backend: nothing to overlap with
        try:
            done.set_result(self.inner.run(layer, hidden, expert_ids, weights))
        except Exception as err:
            done.set_exception(err)
        return done


class _Turn:
    """One micro-batch's backend: starts expert calls, and gives up the dense lock while it waits on them."""

    def __init__(self, experts: AsyncExperts, lock: threading.Lock):
        self.experts = experts
        self.lock = lock
        self.wait_seconds = 0.0

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, hidden, expert_ids, weights).result()

    def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> _Waiting:
        return _Waiting(self, self.experts.submit(layer, hidden, expert_ids, weights))


class _Waiting:
    def __init__(self, turn: _Turn, future: Future):
        self.turn = turn
        self.future = future

    def result(self) -> torch.Tensor:
        if self.future.done():
            return self.future.result()
        start = time.perf_counter()
        self.turn.lock.release()  # the other micro-batch computes while this one waits
        try:
            value = self.future.result()
        finally:
            waited = time.perf_counter() - start
            self.turn.lock.acquire()
            self.turn.wait_seconds += waited
        return value


class _Timed:
    """The plain blocking backend (no `submit`: nothing overlaps), timing its waits."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner
        self.wait_seconds = 0.0

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.inner.run(layer, hidden, expert_ids, weights)
        finally:
            self.wait_seconds += time.perf_counter() - start


class PingPong:
    """Runs the micro-batches of one step: in turns on two threads with overlap, else one after the other."""

    def __init__(self, experts: ExpertBackend, overlap: bool = True, min_split_tokens: int = 64):
        self.experts = experts
        self.async_experts = AsyncExperts(experts)
        self.overlap = overlap
        # Two micro-batches make twice the expert calls, each paying a fixed cost (the call, and on CPUs
        # reading every hit expert's weights): below this many tokens a step stays whole.
        self.min_split_tokens = min_split_tokens
        self._helper = ContextThreadPool(max_workers=1, thread_name_prefix="microbatch") if overlap else None
        self.split_runs = 0  # runs done as two micro-batches (tests and benchmarks read it)

    def run(self, parts: Sequence[Part]) -> tuple[list, float]:
        """Each part's result, and the seconds spent waiting on experts (summed over parts)."""
        if not self.overlap:
            backend = _Timed(self.experts)
            with torch.inference_mode():
                results = [part(backend) for part in parts]
            return results, backend.wait_seconds
        if len(parts) > 2:
            raise ValueError(f"{len(parts)} micro-batches; the ping-pong takes one or two")
        lock = threading.Lock()
        turns = [_Turn(self.async_experts, lock) for _ in parts]

        def body(i: int):
            with torch.inference_mode(), lock:
                return parts[i](turns[i])

        other = self._helper.submit(body, 1) if len(parts) == 2 else None
        self.split_runs += other is not None
        try:
            first = body(0)
        finally:
            second = other.exception() if other is not None else None  # waits; never abandon a running part
        if second is not None:
            raise second
        results = [first] if other is None else [first, other.result()]
        return results, sum(t.wait_seconds for t in turns)

    def cut(self, sizes: Sequence[int]) -> int:
        """Where to split items of these token counts into two micro-batches; 0 = run them as one."""
        if not self.overlap or sum(sizes) < self.min_split_tokens:
            return 0
        return split_point(sizes)

    def close(self) -> None:
        """Stop the helper thread (after any part it runs)."""
        if self._helper is not None:
            self._helper.shutdown(wait=False)


def split_point(sizes: Sequence[int]) -> int:
    """Where to cut items (kept in order) into two runs of about equal total size: 1..len-1 (0 if len < 2)."""
    if len(sizes) < 2:
        return 0
    total, running = sum(sizes), 0
    best, best_gap = 1, None
    for i in range(1, len(sizes)):
        running += sizes[i - 1]
        gap = abs(total - 2 * running)
        if best_gap is None or gap < best_gap:
            best, best_gap = i, gap
    return best
