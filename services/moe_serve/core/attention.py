"""Causal self-attention with grouped-query heads over a batch of sequences, each in its own KV-cache slot.

Legend: T = tokens of the batch (sequences back to back), H = hidden size, N = query heads,
G = key/value heads, D = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.kv_batch import DecodeBatch, KVBatch
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


def self_attention(x: torch.Tensor, w: AttentionWeights, cfg: AttentionConfig, rope: RotaryEmbedding,
                   layer: int, batch: KVBatch | DecodeBatch) -> torch.Tensor:
    """x [T, H] -> [T, H]; `batch` stores this layer's new keys and values and attends each token to its sequence."""
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
    cos, sin = rope.cos_sin(batch.positions, x.dtype)  # [T, D]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = batch.attend(layer, q, k, v)  # [T, N, D]
    return F.linear(out.reshape(tokens, -1), w.o, w.o_bias)
