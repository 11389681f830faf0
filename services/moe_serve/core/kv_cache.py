"""The KV cache: one preallocated tensor for keys and one for values, a slot per sequence.

A pool holds [layers, slots + 1, capacity, G, D]: every sequence of a batch writes into the same
tensor, so a step writes a layer's new keys in one index_put and a decode step attends over the
slots without copying them out one by one; a decode step's tensors keep their addresses from step to
step, which CUDA graphs need. The extra slot is scratch, for the padding rows of a graph's batch.

Why slots and not pages (vLLM's block tables): a slot is a contiguous [capacity, G, D] run, so
attention reads a view and plain torch kernels need no block gather; the price is memory for
slots x the longest sequence rather than for the tokens in use. The pool grows by doubling (slots or
capacity) when a sequence needs more; growing moves the tensors (`version` counts moves, so captured
graphs know to recapture).
Legend: L = attention layers, S = slots, C = capacity in tokens, G = key/value heads, D = head dim.
"""

from __future__ import annotations

import heapq

import torch


class KVPool:
    """Keys (after RoPE) and values of up to `slots` sequences for every layer."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 slots: int = 1, capacity: int = 16, device: torch.device | str = "cpu"):
        # Zeros, not empty: a masked-out position's probability is 0, and 0 * NaN from stale memory is NaN.
        shape = (num_layers, max(slots, 1) + 1, max(capacity, 1), num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, S + 1, C, G, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [L, S + 1, C, G, D]
        self.lengths = [0] * max(slots, 1)  # tokens each slot's sequence has in every layer
        self._free = list(range(max(slots, 1)))  # a heap: the lowest free slot goes out first
        self.version = 0  # bumped whenever keys/values move to new tensors

    @property
    def slots(self) -> int:
        return self.keys.shape[1] - 1

    @property
    def scratch(self) -> int:
        """The slot that padding rows write to and read from; never handed out."""
        return self.slots

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def allocate(self) -> KVCache:
        """An empty sequence in a free slot (the pool doubles its slots when none is free)."""
        if not self._free:
            self._grow(slots=2 * self.slots)
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return KVCache(self, slot)

    def release(self, slot: int) -> None:
        """Give a slot back; its stale keys stay until overwritten (masked out by length)."""
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in use (pool of {self.slots} slots)")
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def reserve(self, slot: int, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens of `slot` (capacity doubles: amortised O(1) per token)."""
        need = self.lengths[slot] + new_tokens
        if need > self.capacity:
            self._grow(capacity=max(need, 2 * self.capacity))

    def _grow(self, slots: int | None = None, capacity: int | None = None) -> None:
        old_slots, old_capacity = self.slots, self.capacity
        slots, capacity = slots or old_slots, capacity or old_capacity
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_zeros((old.shape[0], slots + 1, capacity, *old.shape[3:]))
            grown[:, :old_slots, :old_capacity] = old[:, :old_slots]
            setattr(self, name, grown)
        for slot in range(old_slots, slots):
            self.lengths.append(0)
            heapq.heappush(self._free, slot)
        self.version += 1


class KVCache:
    """One sequence's slot in a pool: what the model and the scheduler hold per sequence."""

    def __init__(self, pool: KVPool, slot: int):
        self.pool = pool
        self.slot = slot

    @property
    def length(self) -> int:
        """Tokens whose keys and values every layer holds."""
        return self.pool.lengths[self.slot]

    @length.setter
    def length(self, tokens: int) -> None:
        """Rewind (or commit) to `tokens`: later writes overwrite what lies past it."""
        if not 0 <= tokens <= self.pool.capacity:
            raise ValueError(f"length {tokens} is outside 0..{self.pool.capacity}")
        self.pool.lengths[self.slot] = tokens

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens."""
        self.pool.reserve(self.slot, new_tokens)

    def advance(self, new_tokens: int) -> None:
        """Commit the tokens every layer has written."""
        self.pool.lengths[self.slot] += new_tokens

    def release(self) -> None:
        """Hand the slot back to the pool (the sequence is finished)."""
        self.pool.release(self.slot)

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of this sequence's first `end` keys and values in `layer`: [end, G, D] each."""
        return self.pool.keys[layer, self.slot, :end], self.pool.values[layer, self.slot, :end]
