"""Token-by-token decoding over a CausalLM: greedy or sampled (temperature, top-k, top-p, seed), stop tokens.

Legend: V = vocabulary, n = prompt tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.experts import ExpertBackend
from moe_serve.core.logprobs import TokenLogprobs, step_logprobs


class FinishReason(enum.Enum):
    """Why generation ended."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop token was generated (it is the last token)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; temperature 0 is greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1.0 = no nucleus cut
    seed: int | None = None  # None = fresh randomness
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: int | None = None  # None: no log-probs; k: the chosen token's and k alternatives (core.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """[V] float32 logits -> next token id: argmax, or a draw after temperature, top-k and top-p (HF's order)."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shifted so the best score is 0: a tiny temperature then sends the rest to -inf, never to inf/inf = nan.
    scores = (logits.float() - logits.max()) / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).
        sorted_scores, order = torch.sort(scores, descending=True)
        before = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1)  # mass of the tokens ahead
        drop = before >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: CausalLM, experts: ExpertBackend, prompt: torch.Tensor,
             params: SamplingParams) -> Iterator[tuple[int, FinishReason | None, TokenLogprobs | None]]:
    """Yield (token, finish reason or None, log-probs if asked) as each token is chosen; prompt [n] int64."""
    cache = model.new_cache(prompt.numel() + params.max_new_tokens)
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    logits = model.forward([prompt], [cache], experts, last_only=True)[0]  # [V]
    for step in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        lp = None if params.logprobs is None else step_logprobs(logits[None], [params.logprobs])[0].of(logits, token)
        if token in params.stop_token_ids:
            yield token, FinishReason.STOP, lp
            return
        if step + 1 == params.max_new_tokens:
            yield token, FinishReason.LENGTH, lp
            return
        yield token, None, lp
        logits = model.forward([torch.tensor([token])], [cache], experts, last_only=True)[0]
