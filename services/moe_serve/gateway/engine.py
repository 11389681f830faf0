"""The gateway's model runner: dense layers here, routed experts through an ExpertBackend."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.experts import ExpertBackend
from moe_serve.core.generation import FinishReason, SamplingParams, generate
from moe_serve.core.simple_model import SimpleMoEModel
from moe_serve.model.tokenizer import TextTokenizer


@dataclass
class ForwardStats:
    """Where one request's time went."""

    total_seconds: float = 0.0
    expert_seconds: float = 0.0


@dataclass(frozen=True)
class GeneratedToken:
    """One streamed token: its id, its text when a tokenizer is known, and the finish reason on the last."""

    token_id: int
    text: str | None
    finish_reason: FinishReason | None


class _TimedBackend:
    """Adds the time spent waiting on experts to the calling thread's current ForwardStats."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner
        self.local = threading.local()

    def run(self, layer, hidden, expert_ids, weights):
        start = time.perf_counter()
        try:
            return self.inner.run(layer, hidden, expert_ids, weights)
        finally:
            stats = getattr(self.local, "stats", None)
            if stats is not None:
                stats.expert_seconds += time.perf_counter() - start


class GatewayEngine:
    """Runs Forward and Generate over the dense model; thread-safe, called from worker threads."""

    def __init__(self, model: SimpleMoEModel | CausalLM, experts: ExpertBackend,
                 tokenizer: TextTokenizer | None = None):
        self.model = model
        self.experts = _TimedBackend(experts)
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return self.model.spec.hidden_size

    @property
    def is_causal(self) -> bool:
        """True for a causal LM (token ids in, logits out); False for simple_moe (hidden states only)."""
        return isinstance(self.model, CausalLM)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ForwardStats]:
        """simple_moe: [..., H] per token. Causal LM: [S, H] or [B, S, H], each row a sequence at positions
        0..S-1 through every decoder layer and the final norm. Same shape out, with timings."""
        stats = ForwardStats()
        self.experts.local.stats = stats
        start = time.perf_counter()
        try:
            if self.is_causal:
                batch = hidden.reshape(-1, hidden.shape[-2], self.hidden_size)  # [B, S, H]
                caches = self.model.new_caches([batch.shape[1]] * batch.shape[0])
                flat = self.model.forward_hidden(batch.reshape(-1, self.hidden_size), caches,
                                                 [batch.shape[1]] * batch.shape[0], self.experts)
                out = flat.reshape(hidden.shape)
            else:
                flat = hidden.reshape(-1, self.hidden_size)  # [T, H]
                out = self.model.forward(flat, self.experts).reshape(hidden.shape)
        finally:
            self.experts.local.stats = None
        stats.total_seconds = time.perf_counter() - start
        return out, stats

    @torch.inference_mode()
    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Float32 logits [n_i, V] at every position of each prompt, all prompts in one batch."""
        caches = self.model.new_caches([len(p) for p in prompts])
        ids = [torch.tensor(list(p), dtype=torch.long) for p in prompts]
        return self.model.forward(ids, caches, self.experts)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 stats: ForwardStats | None = None) -> Iterator[GeneratedToken]:
        """Stream the tokens generated after `prompt_ids`; call next() on a single thread throughout."""
        stats = stats if stats is not None else ForwardStats()
        self.experts.local.stats = stats
        start = time.perf_counter()
        text = self.tokenizer.stream(list(prompt_ids)) if self.tokenizer is not None else None
        try:
            prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
            for token, finish in generate(self.model, self.experts, prompt, params):
                stats.total_seconds = time.perf_counter() - start
                yield GeneratedToken(token, text.push(token, last=finish is not None) if text is not None else None,
                                     finish)
        finally:
            self.experts.local.stats = None
