"""Where a device-routed call's tensors sit in its arena, and how they get there in one copy.

A device-routed call (side_dispatch.start_routed) puts the layer's hidden states [T, H], expert ids
[T, K] (int64) and weights [T, K] (float32) side by side in the server's arena; the server writes the
sums [T, H] after them. Three copies cost three launches of host time (each several times a kernel's
own GPU time on the H200 host). Placed end to end, the three are one run of 4-byte words, and one
`torch.cat` into that run stages them with one kernel. That needs the ids 8-byte aligned right after
the hidden states (T x H x itemsize a multiple of 8: in bf16, any H that is a multiple of 4, as every
real model's is), the tensors contiguous, on one device and already in the arena's dtypes; otherwise
each is copied (and converted) on its own.
The places' views are made once per arena and shape, as the arena is reused call after call.
"""

from __future__ import annotations

import torch

from moe_client import wire
from moe_serve.rpc.codec import TORCH_DTYPES
from moe_serve.rpc.shared_regions import Arena, aligned


def routed_extra(tokens: int, top_k: int) -> int:
    """Bytes an arena holds between the hidden states and the sums (ExpertDispatcher.acquire's `extra`): room for
    the ids and the weights, each on its own aligned boundary."""
    return aligned(tokens * top_k * 8) + aligned(tokens * top_k * 4)


class RoutedPlaces:
    """One arena's places for a device-routed call of `tokens` x `hidden_size`, top-`top_k`: the views to stage
    into and read the sums from, and the SharedTensor messages naming them."""

    def __init__(self, arena: Arena, dtype: int, out_dtype: int, tokens: int, hidden_size: int, top_k: int):
        t, h, k = tokens, hidden_size, top_k
        hidden_bytes = t * h * TORCH_DTYPES[dtype].itemsize
        ids_at = -(-hidden_bytes // 8) * 8  # the first multiple of 8 after the hidden states
        weights_at = ids_at + t * k * 8
        out_at = aligned(hidden_bytes) + routed_extra(t, k)
        self.dtype = TORCH_DTYPES[dtype]
        self.hidden = arena.view(0, dtype, (t, h))
        self.ids = arena.view(ids_at, wire.INT64, (t, k))
        self.weights = arena.view(weights_at, wire.FLOAT32, (t, k))
        self.out = arena.view(out_at, out_dtype, (t, h))  # the server's sums
        # The three inputs as one run of int32 words, when they lie end to end
        self.words = arena.view(0, wire.INT32, ((weights_at + t * k * 4) // 4,)) if ids_at == hidden_bytes else None
        self.messages = {"shared_hidden": arena.message(0, dtype, (t, h)),
                         "shared_output": arena.message(out_at, out_dtype, (t, h)),
                         "shared_expert_ids": arena.message(ids_at, wire.INT64, (t, k)),
                         "shared_weights": arena.message(weights_at, wire.FLOAT32, (t, k))}

    @staticmethod
    def of(arena: Arena, dtype: int, out_dtype: int, tokens: int, hidden_size: int, top_k: int) -> RoutedPlaces:
        """The arena's places for that call, made on first use (per inference mode, as Arena.view's views are)."""
        key = ("routed places", dtype, out_dtype, tokens, hidden_size, top_k, torch.is_inference_mode_enabled())
        places = arena.derived.get(key)
        if places is None:
            places = RoutedPlaces(arena, dtype, out_dtype, tokens, hidden_size, top_k)
            arena.remember(key, places)
        return places

    def stage(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Copy the call's inputs to their places without synchronising: one kernel when they need no
        conversion, else one copy each."""
        tensors = (hidden, expert_ids, weights)
        if (self.words is not None and hidden.dtype == self.dtype and expert_ids.dtype == torch.int64
                and weights.dtype == torch.float32 and all(t.device == self.words.device and t.is_contiguous()
                                                           for t in tensors)):
            torch.cat([t.view(-1).view(torch.int32) for t in tensors], out=self.words)
            return
        self.hidden.copy_(hidden, non_blocking=True)
        self.ids.copy_(expert_ids, non_blocking=True)
        self.weights.copy_(weights, non_blocking=True)
