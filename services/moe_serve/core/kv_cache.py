"""A per-sequence KV cache: one slot per request, so a decode step can batch sequences at different positions.

Legend: L = attention layers, C = capacity in tokens, G = key/value heads, D = head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys (after RoPE) and values of one sequence for every layer, grown by doubling when full."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacity: int = 16, device: torch.device | str = "cpu"):
        shape = (num_layers, max(capacity, 1), num_kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # [L, C, G, D]
        self.values = torch.empty(shape, dtype=dtype, device=device)  # [L, C, G, D]
        self.length = 0  # tokens whose keys and values every layer holds

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens (amortised O(1) per token)."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        capacity = max(need, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_empty((old.shape[0], capacity, *old.shape[2:]))
            grown[:, :self.length] = old[:, :self.length]
            setattr(self, name, grown)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [n, G, D] new keys/values after the cached ones; returns all of this layer's [length + n, G, D]."""
        end = self.length + keys.shape[0]
        self.keys[layer, self.length:end] = keys
        self.values[layer, self.length:end] = values
        return self.keys[layer, :end], self.values[layer, :end]

    def advance(self, new_tokens: int) -> None:
        """Commit the tokens every layer has written."""
        self.length += new_tokens
