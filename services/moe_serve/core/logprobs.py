"""Log-probabilities of generated tokens: the chosen token's and the top-k alternatives at each step.

They are the model's own distribution (log_softmax of the float32 logits), before temperature, top-k
and top-p reshape it for sampling, as OpenAI's API and vLLM's default report them. The normaliser and
the top-k run where the logits are (the gateway's device); only [R] + [R, k] numbers come back.
Legend: R = rows (sequences sampling this step), V = vocabulary, k = alternatives asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class TokenLogprobs:
    """One step: the chosen token's log-prob and the `top` alternatives, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepLogprobs:
    """What one row needs to answer, after the token is picked: its normaliser and its top-k."""

    log_normaliser: float  # logsumexp of the row's logits
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]

    def of(self, logits: torch.Tensor, token: int) -> TokenLogprobs:
        """`logits` [V] float32 of this row (the same numbers the normaliser came from) -> the token's log-prob."""
        return TokenLogprobs(float(logits[token]) - self.log_normaliser,
                             tuple(zip(self.top_ids, self.top_logprobs, strict=True)))


def step_logprobs(logits: torch.Tensor, top_k: list[int]) -> list[StepLogprobs]:
    """[R, V] float32 logits on any device, top_k[r] alternatives for row r -> one StepLogprobs per row."""
    lse = torch.logsumexp(logits, dim=-1)  # [R]
    k = max(top_k, default=0)
    if k:
        values, ids = torch.topk(logits, k, dim=-1)  # [R, k], sorted, most likely first
        values = (values - lse[:, None]).cpu().tolist()
        ids = ids.cpu().tolist()
    else:
        values = ids = [[] for _ in top_k]
    lse = lse.cpu().tolist()
    return [StepLogprobs(lse[r], tuple(ids[r][:top_k[r]]), tuple(values[r][:top_k[r]])) for r in range(len(top_k))]
