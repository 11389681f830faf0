"""Causal self-attention with grouped-query heads over a batch of sequences, each with its own KV cache.

Legend: T = tokens of the batch (sequences back to back), H = hidden size, N = query heads,
G = key/value heads, R = N / G query heads per key/value head, D = head dim, n = one sequence's
new tokens, L = its cached + new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.decode_attention import attend_decode
from moe_serve.core.kv_cache import KVCache
from moe_serve.core.norms import rms_norm
from moe_serve.core.rotary import RotaryEmbedding, apply_rotary


@dataclass(frozen=True)
class AttentionConfig:
    """Head layout and per-architecture details of one model's attention."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: str | None = None  # None, "head" (per head, qwen3_moe) or "full" (over all heads, olmoe)
    clip_qkv: float | None = None
    eps: float = 1e-6


@dataclass(frozen=True)
class AttentionWeights:
    """Projections of one layer: q [N*D, H], k and v [G*D, H], o [H, N*D]; optional biases and q/k norms."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def positions_of(caches: Sequence[KVCache], lengths: Sequence[int]) -> torch.Tensor:
    """[T] absolute position of every new token: each sequence continues from its cache's length."""
    device = caches[0].keys.device if caches else None
    return torch.cat([torch.arange(c.length, c.length + n, device=device)
                      for c, n in zip(caches, lengths, strict=True)])


def self_attention(x: torch.Tensor, w: AttentionWeights, cfg: AttentionConfig, rope: RotaryEmbedding,
                   layer: int, caches: Sequence[KVCache], lengths: Sequence[int],
                   positions: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> [T, H]; writes this layer's new keys and values into each sequence's cache."""
    q = F.linear(x, w.q, w.q_bias)  # [T, N*D]
    k = F.linear(x, w.k, w.k_bias)  # [T, G*D]
    v = F.linear(x, w.v, w.v_bias)  # [T, G*D]
    if cfg.qk_norm == "full":
        q, k = rms_norm(q, w.q_norm, cfg.eps), rms_norm(k, w.k_norm, cfg.eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    tokens = x.shape[0]
    q = q.view(tokens, cfg.num_heads, cfg.head_dim)  # [T, N, D]
    k = k.view(tokens, cfg.num_kv_heads, cfg.head_dim)  # [T, G, D]
    v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)  # [T, G, D]
    if cfg.qk_norm == "head":
        q, k = rms_norm(q, w.q_norm, cfg.eps), rms_norm(k, w.k_norm, cfg.eps)
    cos, sin = rope.cos_sin(positions, x.dtype)  # [T, D]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    out = torch.empty_like(q)  # [T, N, D]
    batched = sum(n == 1 for n in lengths) > 1  # several decode tokens: attend to them together
    rows, row_keys, row_values = [], [], []
    start = 0
    for cache, n in zip(caches, lengths, strict=True):
        keys, values = cache.write(layer, k[start:start + n], v[start:start + n])  # [L, G, D]
        if batched and n == 1:
            rows.append(start)
            row_keys.append(keys)
            row_values.append(values)
        else:
            out[start:start + n] = _attend(q[start:start + n], keys, values, cache.length, cfg)
        start += n
    if rows:
        index = torch.tensor(rows, device=q.device)
        out[index] = attend_decode(q[index], row_keys, row_values, cfg.num_kv_heads, cfg.head_dim)
    return F.linear(out.reshape(tokens, -1), w.o, w.o_bias)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
            cfg: AttentionConfig) -> torch.Tensor:
    """One sequence: q [n, N, D] at positions past..past+n-1 over keys/values [L, G, D] -> [n, N, D]."""
    n, length = q.shape[0], keys.shape[0]
    groups, per_group = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    qh = q.permute(1, 0, 2).reshape(groups, per_group, n, cfg.head_dim)  # [G, R, n, D]; head = g*R + r
    kh = keys.permute(1, 0, 2)[:, None]  # [G, 1, L, D]
    vh = values.permute(1, 0, 2)[:, None]  # [G, 1, L, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * cfg.head_dim ** -0.5  # [G, R, n, L]
    query_pos = torch.arange(past, past + n, device=q.device)[:, None]  # [n, 1]
    future = torch.arange(length, device=q.device)[None, :] > query_pos  # [n, L]
    scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32, as the references do
    out = torch.matmul(probs, vh)  # [G, R, n, D]
    return out.reshape(cfg.num_heads, n, cfg.head_dim).permute(1, 0, 2)  # [n, N, D]

