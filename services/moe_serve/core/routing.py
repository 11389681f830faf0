"""Router: scores -> top-k experts per token -> gate weights.

Legend: T = tokens, H = hidden size, E = routed experts, K = experts per token (top-k).
"""

from __future__ import annotations

import torch


def route(
    logits: torch.Tensor, top_k: int, renormalize: bool, softmax_fp32: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, optional renormalisation; returns (weights [T, K] fp32, ids [T, K] int64)."""
    # logits: [T, E]
    scores = logits.softmax(dim=-1, dtype=torch.float32) if softmax_fp32 else logits.softmax(dim=-1)
    weights, ids = torch.topk(scores, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights.float(), ids


def router_logits(hidden: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """[T, H] x [E, H] -> [T, E] router logits, in the router weight's dtype."""
    return torch.nn.functional.linear(hidden.to(router_weight.dtype), router_weight)
