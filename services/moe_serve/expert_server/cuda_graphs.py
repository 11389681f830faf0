"""CUDA graphs for the expert path: one launch per call instead of ~30 kernel launches.

A call's work is ~30 small kernels around two grouped GEMMs; launched one by one from Python they
cost ~0.5 ms of CPU per call, which the GPU spends idle below ~8k tokens. Each (layer, bucket of
padded token counts, K) is captured once and replayed. Inputs and outputs live in static buffers
shared by every graph of the device (calls run one at a time); padding rows carry expert id -1 and
so never reach the GEMMs.
"""

from __future__ import annotations

import torch

from moe_serve.core.grouped import StackedExperts, Swiglu, expert_sums

MIN_BUCKET = 16


def bucket(tokens: int) -> int:
    """Padded token count of a graph: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (tokens - 1).bit_length())


class GraphedExperts:
    """Captured expert_sums for one device; `run` falls back to eager launches above max_tokens."""

    def __init__(self, device: torch.device, hidden_size: int, dtype: torch.dtype, max_tokens: int):
        self.device = device
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_tokens = bucket(max_tokens)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self._static: dict[int, tuple[torch.Tensor, ...]] = {}  # K -> (hidden, ids, weights)
        self._out = torch.empty(self.max_tokens, hidden_size, device=device, dtype=torch.float32)
        # (layer, bucket, K) -> the stack and token tally captured, and the graph: a live load or drop swaps a
        # layer's stack, and a graph of the old one (maybe captured while the swap happened) is never replayed
        # for the new.
        self._graphs: dict[tuple[int, int, int], tuple[StackedExperts, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def _buffers(self, k: int) -> tuple[torch.Tensor, ...]:
        if k not in self._static:
            self._static[k] = (
                torch.zeros(self.max_tokens, self.hidden_size, device=self.device, dtype=self.dtype),
                torch.full((self.max_tokens, k), -1, device=self.device, dtype=torch.long),
                torch.zeros(self.max_tokens, k, device=self.device, dtype=torch.float32),
            )
        return self._static[k]

    def run(self, layer: int, stacked: StackedExperts, slot_of: torch.Tensor, swiglu: Swiglu, tally: torch.Tensor,
            hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """expert_sums over device tensors, tokens counted into `tally` (in the graph: no host cost); returns
        [T, H] float32 (a view valid until the next run)."""
        t, k = expert_ids.shape
        if t > self.max_tokens:
            return expert_sums(hidden, expert_ids, weights, stacked, slot_of, swiglu, tally=tally)
        b = bucket(t)
        s_hidden, s_ids, s_weights = self._buffers(k)
        s_hidden[:t].copy_(hidden)
        s_ids[:t].copy_(expert_ids)
        if t < b:
            s_ids[t:b].fill_(-1)
        s_weights[:t].copy_(weights)
        key = (layer, b, k)
        entry = self._graphs.get(key)
        if entry is None or entry[0] is not stacked or entry[1] is not tally:
            entry = self._graphs[key] = (stacked, tally, self._capture(b, s_hidden, s_ids, s_weights, stacked,
                                                                       slot_of, swiglu, tally))
        entry[2].replay()
        return self._out[:t]

    def forget(self, layer: int) -> None:
        """Drop `layer`'s graphs: its experts changed (a live load or drop), the next call captures anew."""
        for key in [key for key in self._graphs if key[0] == layer]:
            del self._graphs[key]

    def _capture(self, b, s_hidden, s_ids, s_weights, stacked, slot_of, swiglu, tally) -> torch.cuda.CUDAGraph:
        def body(counts: torch.Tensor) -> None:
            expert_sums(s_hidden[:b], s_ids[:b], s_weights[:b], stacked, slot_of, swiglu, out=self._out[:b],
                        tally=counts)

        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            body(torch.zeros_like(tally))  # warm-up outside capture (Triton compiles, cuBLAS/CUTLASS pick
            # kernels), counted nowhere: the call is counted once, by the replay below
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: work that another thread of this process starts meanwhile (a gateway in the same
        # process, in tests) neither fails nor breaks the capture; the bank's lock keeps our own out.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            body(tally)
        return graph
