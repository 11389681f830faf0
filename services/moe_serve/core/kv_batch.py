"""Where a step's tokens sit in the KV pools, worked out once per forward and used by every layer.

A layer's attention asks its batch to store the new keys/values and attend. `KVBatch` serves any
mix of prefill chunks and decode tokens: per pool, one index_put stores every token's keys (and one
its values), decode tokens attend together over their slots, and prefill chunks attend one sequence
at a time over views of their slot. `DecodeBatch` is the fixed-shape case a CUDA graph captures:
one token per row, slots and lengths in device tensors that the caller refills between replays.
Legend: T = tokens of the batch, N = query heads, G = key/value heads, D = head dim, B = decode rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moe_serve.core.decode_attention import attend_slots
from moe_serve.core.kv_cache import KVCache, KVPool


def attend_causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int, num_kv_heads: int,
                  ) -> torch.Tensor:
    """One sequence: q [n, N, D] at positions past..past+n-1 over keys/values [L, G, D] -> [n, N, D]."""
    n, heads, head_dim = q.shape
    length = keys.shape[0]
    qh = q.permute(1, 0, 2).reshape(num_kv_heads, heads // num_kv_heads, n, head_dim)  # [G, R, n, D]; head = g*R + r
    kh = keys.permute(1, 0, 2)[:, None]  # [G, 1, L, D]
    vh = values.permute(1, 0, 2)[:, None]  # [G, 1, L, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * head_dim ** -0.5  # [G, R, n, L]
    query_pos = torch.arange(past, past + n, device=q.device)[:, None]  # [n, 1]
    future = torch.arange(length, device=q.device)[None, :] > query_pos  # [n, L]
    scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32, as the references do
    out = torch.matmul(probs, vh)  # [G, R, n, D]
    return out.reshape(heads, n, head_dim).permute(1, 0, 2)  # [n, N, D]


@dataclass
class DecodeBatch:
    """B decode tokens, one per slot of `pool`: slots [B] and lengths [B] (counting the new token) on the
    pool's device, keys read up to `span` >= every length. Rows may repeat the scratch slot (padding)."""

    pool: KVPool
    slots: torch.Tensor  # [B] int64
    lengths: torch.Tensor  # [B] int64
    span: int

    @property
    def positions(self) -> torch.Tensor:
        """[B] position of each new token."""
        return self.lengths - 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [B, G, D] at each row's position; q [B, N, D] over its slot -> [B, N, D]."""
        where = (self.slots, self.lengths - 1)
        self.pool.keys[layer].index_put_(where, k)
        self.pool.values[layer].index_put_(where, v)
        return attend_slots(q, self.pool.keys[layer], self.pool.values[layer], self.slots, self.lengths, self.span)


@dataclass
class _PoolPart:
    """The tokens of one pool within a batch."""

    pool: KVPool
    tokens: torch.Tensor | None  # [t] rows of the batch (None: all of them, in order)
    slots: torch.Tensor  # [t] slot of each token
    positions: torch.Tensor  # [t] position of each token
    decode_rows: torch.Tensor | None = None  # [B] rows of single-token sequences (None: all rows)
    decode: DecodeBatch | None = None
    prefill: list[tuple[int, int, KVCache]] = field(default_factory=list)  # (first row, tokens, cache)


class KVBatch:
    """Sequences back to back (lengths[i] new tokens of caches[i], continuing from its length)."""

    def __init__(self, caches: Sequence[KVCache], lengths: Sequence[int], device: torch.device):
        parts: dict[int, dict] = {}
        start = 0
        for cache, n in zip(caches, lengths, strict=True):
            part = parts.setdefault(id(cache.pool), {"pool": cache.pool, "rows": [], "slots": [], "positions": [],
                                                      "decode": [], "prefill": []})
            part["rows"].append(torch.arange(start, start + n))
            part["slots"].append(torch.full((n,), cache.slot))
            part["positions"].append(torch.arange(cache.length, cache.length + n))
            if n == 1:
                part["decode"].append((start, cache.slot, cache.length + 1))
            else:
                part["prefill"].append((start, n, cache))
            start += n
        self.tokens = start
        self.positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, lengths, strict=True)]
                                   ).to(device)  # [T]
        self.parts = [self._part(p, device) for p in parts.values()]

    def _part(self, p: dict, device: torch.device) -> _PoolPart:
        rows = torch.cat(p["rows"])
        every = rows.numel() == self.tokens  # one pool holds the whole batch, in order
        part = _PoolPart(p["pool"], None if every else rows.to(device), torch.cat(p["slots"]).to(device),
                         torch.cat(p["positions"]).to(device), prefill=p["prefill"])
        if p["decode"]:
            first, slots, lengths = zip(*p["decode"], strict=True)
            all_rows = len(first) == self.tokens
            part.decode_rows = None if all_rows else torch.tensor(first, device=device)
            part.decode = DecodeBatch(p["pool"], torch.tensor(slots, device=device),
                                      torch.tensor(lengths, device=device), max(lengths))
        return part

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [T, G, D] in each token's slot; q [T, N, D] over its own sequence -> [T, N, D]."""
        if len(self.parts) == 1 and self.parts[0].decode is not None and self.parts[0].decode_rows is None:
            return self.parts[0].decode.attend(layer, q, k, v)  # a pure decode step
        for part in self.parts:  # every token's keys first: a prefill chunk reads its own
            where = (part.slots, part.positions)
            part.pool.keys[layer].index_put_(where, k if part.tokens is None else k[part.tokens])
            part.pool.values[layer].index_put_(where, v if part.tokens is None else v[part.tokens])
        out = torch.empty_like(q)  # [T, N, D]
        for part in self.parts:
            if part.decode is not None:
                d = part.decode
                rows = part.decode_rows
                got = attend_slots(q if rows is None else q[rows], part.pool.keys[layer], part.pool.values[layer],
                                   d.slots, d.lengths, d.span)
                if rows is None:
                    out.copy_(got)
                else:
                    out[rows] = got
            for first, n, cache in part.prefill:
                keys, values = cache.layer(layer, cache.length + n)
                out[first:first + n] = attend_causal(q[first:first + n], keys, values, cache.length,
                                                     part.pool.keys.shape[3])
        return out
