"""Attention of many single-token queries (decode steps) at once, each over its own sequence's keys.

Looping over sequences costs some twenty small ops per sequence and layer, which at dozens of
sequences outweighs the arithmetic. Here the sequences' keys and values are padded into one batch
(padding masked out) and attended in one go. Each query is the newest token of its sequence, so it
sees all of that sequence's keys: no causal mask beyond the padding.
Legend: B = sequences, N = query heads, G = key/value heads, R = N / G, D = head dim, L = longest keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence


def attend_decode(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """q [B, N, D] (one query per sequence) over keys[b], values[b] [L_b, G, D] -> [B, N, D]."""
    batch, heads = q.shape[0], q.shape[1]
    lengths = torch.tensor([k.shape[0] for k in keys], device=q.device)  # [B]
    kh = pad_sequence(list(keys), batch_first=True).permute(0, 2, 1, 3)[:, :, None]  # [B, G, 1, L, D]
    vh = pad_sequence(list(values), batch_first=True).permute(0, 2, 1, 3)[:, :, None]  # [B, G, 1, L, D]
    qh = q.reshape(batch, num_kv_heads, heads // num_kv_heads, 1, head_dim)  # [B, G, R, 1, D]; head = g*R + r
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * head_dim ** -0.5  # [B, G, R, 1, L]
    padding = torch.arange(kh.shape[3], device=q.device)[None, :] >= lengths[:, None]  # [B, L]
    scores = scores.masked_fill(padding[:, None, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32, as the references do
    return torch.matmul(probs, vh).reshape(batch, heads, head_dim)  # [B, N, D]
