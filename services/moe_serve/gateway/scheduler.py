"""Continuous batching of Generate: one thread owns the model and runs it step after step.

Each step is one flat batch: the next token of every decoding sequence plus prompt chunks of new
ones, up to a prefill budget, so a long prompt cannot stall everyone's next token for long. A new
request joins at the next step; a finished one (stop token, max_new_tokens, client gone) leaves at
once and its KV-cache slot goes back to the pool. Every sequence keeps its own slot of one KV pool
(so a step stores each layer's keys in one op and decode tokens attend together), its own sampling
settings and random generator, and sequences never mix in the model (attention is per sequence,
everything else per token), so a request's tokens do not depend on what else runs beside it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.decode_step import DecodeStep
from moe_serve.core.experts import ExpertBackend
from moe_serve.core.generation import FinishReason, SamplingParams, sample_next
from moe_serve.gateway.engine import ForwardStats, GeneratedToken
from moe_serve.gateway.overlap import PingPong
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.process.handoff import put_from_thread
from moe_serve.rpc import request_ids
from moe_serve.rpc.errors import ResourceExhausted, Unavailable

_END = object()


@dataclass(frozen=True)
class SchedulerLimits:
    """How much one step and the queue may hold."""

    max_running: int = 128  # sequences decoding or prefilling at once
    max_queued: int = 1024  # requests waiting for a slot; one more is RESOURCE_EXHAUSTED
    max_prefill_tokens: int = 128  # prompt tokens per step (at least one prompt chunk always runs)


class _Sequence:
    """One Generate request inside the scheduler."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, stats: ForwardStats,
                 tokenizer: TextTokenizer | None):
        self.prompt = torch.tensor(list(prompt), dtype=torch.long)  # [n]
        self.params = params
        self.stats = stats
        self.text = tokenizer.stream(list(prompt)) if tokenizer is not None else None
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.arrival = time.perf_counter()
        self.request_id = request_ids.current()  # the caller's, for the expert servers' logs
        self.cache = None
        self.prefilled = 0  # prompt tokens in the cache
        self.next_token = -1  # last token sampled, fed in the next step
        self.generated = 0
        self.done = False
        self.cancelled = False  # the client went away
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt.numel()

    def emit(self, item: object) -> None:
        """Hand a token, an error or the end to the stream (from the scheduler thread)."""
        if not put_from_thread(self.loop, self.queue, item):  # the event loop has closed: nobody is listening
            self.cancelled = True


@dataclass
class _Entry:
    """What one sequence feeds into a step."""

    seq: _Sequence
    tokens: torch.Tensor  # [n] int64
    samples: bool  # its last position's logits pick the next token


class GenerateScheduler:
    """Runs every Generate stream in shared steps on one dedicated thread."""

    def __init__(self, model: CausalLM, pingpong: PingPong, tokenizer: TextTokenizer | None = None,
                 limits: SchedulerLimits = SchedulerLimits(), decode_graphs: bool = False):
        """`decode_graphs`: steps where every sequence feeds one token run through core.decode_step (its
        dense stages as CUDA graphs on a GPU, eager on the CPU), one DecodeStep per micro-batch."""
        self.model = model
        self.pingpong = pingpong
        self.tokenizer = tokenizer
        self.limits = limits
        self._waiting: deque[_Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Slots x the longest sequence, grown by doubling; touched on the batch thread only.
        self.pool = model.new_pool(slots=4, capacity=128)
        self._decode_steps: dict[int, DecodeStep] | None = {} if decode_graphs else None
        self.steps = 0  # steps run so far (tests and benchmarks read it)
        self.staged_parts = 0  # micro-batches run through a DecodeStep (tests read it)
        self.active = 0  # sequences admitted and not yet finished or dropped
        self._thread = threading.Thread(target=self._loop, name="generate-scheduler", daemon=True)
        self._thread.start()

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                     stats: ForwardStats) -> AsyncIterator[GeneratedToken]:
        """Yield the tokens generated after `prompt_ids` as the steps produce them; `stats` follow along."""
        seq = _Sequence(prompt_ids, params, stats, self.tokenizer)
        seq.loop, seq.queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            if self._closed:
                raise Unavailable("Generate: the gateway is shutting down")
            if len(self._waiting) >= self.limits.max_queued:  # clients that left while waiting hold no slot
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
            if len(self._waiting) >= self.limits.max_queued:
                raise ResourceExhausted(f"Generate: {len(self._waiting)} requests already wait for a slot, the "
                                        f"gateway's limit (--max-queued-requests {self.limits.max_queued}); "
                                        "retry later")
            self._waiting.append(seq)
            self._cond.notify()
        try:
            while (item := await seq.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            seq.cancelled = True  # a no-op once done; else the next step drops it and its cache

    def join(self, timeout: float | None = None) -> None:
        """Wait for the batch thread to end (after close)."""
        self._thread.join(timeout)

    def close(self) -> None:
        """Stop after the current step; every request still open ends with UNAVAILABLE."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        running: list[_Sequence] = []
        while True:
            with self._cond:
                while not self._waiting and not running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                while self._waiting and len(running) < self.limits.max_running:
                    running.append(self._waiting.popleft())
            running = self._keep(running)
            if running:
                self._step(running)
                running = self._keep(running)
            self.active = len(running)
        with self._cond:
            left = running + list(self._waiting)
            self._waiting.clear()
        for seq in left:
            seq.emit(Unavailable("Generate: the gateway is shutting down"))
        for seq in running:
            if seq.cache is not None:
                seq.cache.release()

    @staticmethod
    def _keep(running: list[_Sequence]) -> list[_Sequence]:
        """The sequences still running; the others' KV slots go back to the pool."""
        kept = []
        for seq in running:
            if seq.done or seq.cancelled:
                if seq.cache is not None:
                    seq.cache.release()
                    seq.cache = None
            else:
                kept.append(seq)
        return kept

    def _plan(self, running: list[_Sequence]) -> list[_Entry]:
        """Every decoding sequence's next token, then prompt chunks in arrival order within the budget."""
        entries = [_Entry(s, torch.tensor([s.next_token]), True) for s in running if s.decoding]
        budget = self.limits.max_prefill_tokens
        for seq in running:
            if seq.decoding or budget <= 0:
                continue
            n = min(budget, seq.prompt.numel() - seq.prefilled)
            if seq.cache is None:
                seq.cache = self.pool.allocate()
            entries.append(_Entry(seq, seq.prompt[seq.prefilled:seq.prefilled + n],
                                  seq.prefilled + n == seq.prompt.numel()))
            budget -= n
        return entries

    def _step(self, running: list[_Sequence]) -> None:
        entries = self._plan(running)
        for entry in entries:  # before the micro-batches start: growing the pool moves its tensors
            entry.seq.cache.reserve(entry.tokens.numel())
        cut = self.pingpong.cut([e.tokens.numel() for e in entries])
        groups = [entries[:cut], entries[cut:]] if cut else [entries]
        token = request_ids.bind(request_ids.joined([e.seq.request_id for e in entries]))
        try:
            results, waited = self.pingpong.run([lambda backend, g=g, i=i: self._part(g, backend, i)
                                                 for i, g in enumerate(groups)])
        except Exception as err:  # e.g. an expert server is down: this step's requests fail, the rest go on
            for entry in entries:
                entry.seq.done = True
                entry.seq.emit(err)
            return
        finally:
            request_ids.unbind(token)
        self.steps += 1
        logits = [row for rows in results for row in rows]
        now = time.perf_counter()
        for entry, row in zip(entries, logits, strict=True):
            seq = entry.seq
            seq.stats.expert_seconds += waited
            if not seq.decoding:
                seq.prefilled += entry.tokens.numel()
            if row is not None:
                self._sample(seq, row, now)

    def _part(self, entries: list[_Entry], backend: ExpertBackend, group: int) -> list[torch.Tensor | None]:
        """One micro-batch (the `group`-th of the step) through the model: [V] logits for each entry that
        samples, else None."""
        lengths = [e.tokens.numel() for e in entries]
        tokens = torch.cat([e.tokens for e in entries])
        caches = [e.seq.cache for e in entries]
        if self._decode_steps is not None and tokens.numel() == len(entries):
            if group not in self._decode_steps:  # its own buffers and graphs: the micro-batches run side by side
                self._decode_steps[group] = DecodeStep(self.model, self.pool)
            self.staged_parts += 1  # micro-batches compute in turns (PingPong's lock): no lost update
            hidden = self._decode_steps[group].run(tokens, caches, backend)  # [T, H]
        else:
            hidden = self.model.forward_hidden(self.model.embed(tokens), caches, lengths, backend)  # [T, H]
        ends = torch.tensor(lengths).cumsum(0) - 1
        rows = [i for i, e in enumerate(entries) if e.samples]
        out: list[torch.Tensor | None] = [None] * len(entries)
        if rows:
            picked = self.model.logits(hidden[ends[rows].to(hidden.device)])  # [R, V] float32
            for i, row in zip(rows, picked.unbind(0), strict=True):
                out[i] = row
        return out

    def _sample(self, seq: _Sequence, logits: torch.Tensor, now: float) -> None:
        """Pick, stream and record the next token, as core.generation.generate does for one sequence."""
        token = sample_next(logits, seq.params, seq.generator)
        seq.generated += 1
        finish = None
        if token in seq.params.stop_token_ids:
            finish = FinishReason.STOP
        elif seq.generated == seq.params.max_new_tokens:
            finish = FinishReason.LENGTH
        seq.next_token = token
        seq.stats.total_seconds = now - seq.arrival
        text = seq.text.push(token, last=finish is not None) if seq.text is not None else None
        seq.emit(GeneratedToken(token, text, finish))
        if finish is not None:
            seq.done = True
            seq.emit(_END)
