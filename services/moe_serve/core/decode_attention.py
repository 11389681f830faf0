"""Attention of many single-token queries (decode steps) at once, each over its own slot of a KV pool.

Looping over sequences costs some twenty small ops per sequence and layer, which at dozens of
sequences outweighs the arithmetic. Here the batch's slots are read to a common span (positions at
or past a sequence's length masked out) and attended in one go, with no host synchronisation and
shapes fixed by (B, span), so a CUDA graph can hold it. Each query is the newest token of its
sequence, so it sees all of that sequence's keys: no causal mask beyond the length.
Legend: B = sequences, S = slots, C = capacity, N = query heads, G = key/value heads, R = N / G,
D = head dim, P = span (positions read per sequence, at least the longest length).
"""

from __future__ import annotations

import torch


def attend_slots(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor, span: int) -> torch.Tensor:
    """q [B, N, D] over keys/values [S, C, G, D] of slots [B], each its first lengths[b] <= span -> [B, N, D]."""
    batch, heads, head_dim = q.shape
    groups = keys.shape[2]
    kh = keys[:, :span].index_select(0, slots).permute(0, 2, 3, 1)  # [B, G, D, P]
    vh = values[:, :span].index_select(0, slots).permute(0, 2, 1, 3)  # [B, G, P, D]
    qh = q.reshape(batch, groups, heads // groups, head_dim)  # [B, G, R, D]; head = g*R + r
    scores = torch.matmul(qh, kh) * head_dim ** -0.5  # [B, G, R, P]
    past_end = torch.arange(span, device=q.device)[None, :] >= lengths[:, None]  # [B, P]
    scores = scores.masked_fill(past_end[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32, as the references do
    return torch.matmul(probs, vh).reshape(batch, heads, head_dim)  # [B, N, D]
