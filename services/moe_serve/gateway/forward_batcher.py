"""Dynamic batching of Forward requests: whatever is queued (up to a token budget, waiting at most a
short delay for more) runs through the model as one batch, and each request gets its own rows back.

simple_moe tokens are independent, so requests are simply stacked. For a causal LM each row of a
request is a sequence with its own (fresh) KV cache, and the flat batch keeps every sequence
separate: attention never looks across them, every other op is per token.
Legend: T = tokens, H = hidden size, B = sequences of a request, S = their length.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.experts import ExpertBackend
from moe_serve.core.simple_model import SimpleMoEModel
from moe_serve.gateway.engine import ForwardStats
from moe_serve.gateway.overlap import PingPong
from moe_serve.process.handoff import settle_from_thread
from moe_serve.rpc import request_ids
from moe_serve.rpc.errors import ResourceExhausted


@dataclass
class _Pending:
    hidden: torch.Tensor  # [..., H] as the client sent it
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # the caller went away (cancelled): skip it
    request_id: str = field(default_factory=request_ids.current)  # the caller's, for the expert servers' logs


class ForwardBatcher:
    """Collects concurrent Forward requests and runs them as batches on one dedicated thread."""

    def __init__(self, model: SimpleMoEModel | CausalLM, pingpong: PingPong, max_batch_tokens: int = 4096,
                 max_queue_delay: float = 0.002, max_queued: int = 1024):
        self.model = model
        self.pingpong = pingpong
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay = max_queue_delay
        self.max_queued = max_queued
        self.causal = isinstance(model, CausalLM)
        self._queue: deque[_Pending] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # batches run so far (tests and benchmarks read it)
        self._thread = threading.Thread(target=self._loop, name="forward-batcher", daemon=True)
        self._thread.start()

    async def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ForwardStats]:
        """Run `hidden` ([..., H]; a causal LM takes [S, H] or [B, S, H]) in the next batch that has room."""
        loop = asyncio.get_running_loop()
        item = _Pending(hidden, hidden.numel() // hidden.shape[-1], loop, loop.create_future())
        with self._cond:
            if len(self._queue) >= self.max_queued:
                raise ResourceExhausted(f"Forward: {len(self._queue)} requests already queued, the gateway's "
                                        f"limit (--max-queued-requests {self.max_queued}); retry later")
            self._queue.append(item)
            self._queued_tokens += item.tokens
            self._cond.notify()
        try:
            return await item.future
        finally:
            item.abandoned = True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the batch thread to end (after close)."""
        self._thread.join(timeout)

    def close(self) -> None:
        """Stop taking batches; queued requests fail when the loop goes away."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is due: the budget is full or the oldest request waited max_queue_delay."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            due = self._queue[0].arrival + self.max_queue_delay
            while self._queued_tokens < self.max_batch_tokens and not self._closed:
                left = due - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, tokens = [], 0
            while self._queue and (not batch or tokens + self._queue[0].tokens <= self.max_batch_tokens):
                item = self._queue.popleft()
                self._queued_tokens -= item.tokens
                if not item.abandoned:
                    batch.append(item)
                    tokens += item.tokens
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            token = request_ids.bind(request_ids.joined([item.request_id for item in batch]))
            try:
                outs, expert_seconds = self.run([item.hidden for item in batch])
            except Exception as err:  # every request of the batch gets the error (e.g. an expert server is down)
                for item in batch:
                    settle_from_thread(item.loop, item.future, error=err)
                continue
            finally:
                request_ids.unbind(token)
            self.batches += 1
            now = time.perf_counter()
            for item, out in zip(batch, outs, strict=True):
                stats = ForwardStats(total_seconds=now - item.arrival, expert_seconds=expert_seconds)
                settle_from_thread(item.loop, item.future, (out, stats))

    def run(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """Each request's output (same shape as its input), computed as one batch; and the expert wait."""
        h = self.model.spec.hidden_size
        if self.causal:
            # Every [S, H] row of every request is one sequence.
            seqs = [s for x in inputs for s in x.reshape(-1, x.shape[-2], h).unbind(0)]
            cut = self.pingpong.cut([s.shape[0] for s in seqs])
            groups = [seqs[:cut], seqs[cut:]] if cut else [seqs]
            parts = [lambda backend, g=g: self._causal_part(g, backend) for g in groups]
            results, waited = self.pingpong.run(parts)
            flat = torch.cat([out for r in results for out in r])  # every sequence's [S, H], in order
        else:
            tokens = torch.cat([x.reshape(-1, h) for x in inputs])  # [T, H]
            half = tokens.shape[0] // 2  # tokens are independent: any cut will do
            cut = half if self.pingpong.cut([half, tokens.shape[0] - half]) else 0
            groups = [tokens[:cut], tokens[cut:]] if cut else [tokens]
            parts = [lambda backend, g=g: self.model.forward(g, backend) for g in groups]
            results, waited = self.pingpong.run(parts)
            flat = torch.cat(results)
        sizes = [x.numel() // h for x in inputs]
        return [out.reshape(x.shape) for out, x in zip(flat.split(sizes), inputs, strict=True)], waited

    def _causal_part(self, seqs: list[torch.Tensor], backend: ExpertBackend) -> list[torch.Tensor]:
        lengths = [s.shape[0] for s in seqs]
        caches = self.model.new_caches(lengths)
        out = self.model.forward_hidden(torch.cat(seqs), caches, lengths, backend)  # [T, H]
        return list(out.split(lengths))
