"""A decode step (one new token for each of B sequences of one KV pool) as stages between routed-expert calls.

The step is cut at each MoE layer's routed-expert call: stage 0 embeds and runs up to the first MoE
layer's routing (its shared experts included), stage j adds layer j's routed sum and runs on to the
next call, the last stage ends with the final norm. Every stage reads and writes fixed buffers of
its batch bucket (B padded to a power of two; padding rows use the pool's scratch slot and route to
no expert), so on a GPU each stage of each (bucket, span) is captured once as a CUDA graph and
replayed; between two replays the host makes the expert call. With an expert backend that can itself
be captured (`capturable = True`: no host synchronisation, e.g. core.stacked_experts), the whole step
is one graph. Without a GPU the same stages run eagerly on the same buffers.
Legend: B = sequences, b = B padded to its bucket, H = hidden size, K = top-k, P = attention span.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.decoder import add_experts, attention_residual, route_tokens, shared_experts
from moe_serve.core.experts import ExpertBackend, start_experts, swiglu
from moe_serve.core.kv_batch import DecodeBatch
from moe_serve.core.kv_cache import KVCache, KVPool
from moe_serve.core.norms import rms_norm
from moe_serve.core.step_graphs import GraphRecorder, StepGraphs

MIN_SPAN = 16


def bucket(n: int, least: int = 1) -> int:
    """The next power of two >= n, at least `least`."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@dataclass
class _Buffers:
    """Everything the stages of one batch bucket read and write; fixed addresses for the graphs."""

    tokens: torch.Tensor  # [b] int64
    slots: torch.Tensor  # [b] int64; padding rows: the scratch slot
    lengths: torch.Tensor  # [b] int64, counting the new token; padding rows: 1
    h: torch.Tensor  # [b, H] residual stream, model dtype
    x: torch.Tensor  # [b, H] the pending MoE layer's input
    ids: torch.Tensor  # [b, K] int64; padding rows -1
    weights: torch.Tensor  # [b, K] float32
    shared: torch.Tensor  # [b, H] shared experts' output (zeros for models without)
    routed: torch.Tensor  # [b, H] float32, the routed experts' sum (written between stages)
    out: torch.Tensor  # [b, H] final hidden states


class DecodeStep:
    """Runs decode steps of `model` over sequences of `pool`; CUDA graphs on a CUDA model unless `graphs` is False."""

    def __init__(self, model: CausalLM, pool: KVPool, graphs: bool | None = None,
                 recorder: GraphRecorder | None = None):
        self.model = model
        self.pool = pool
        self.moe_layers = [i for i, w in enumerate(model.layers) if w.is_moe]
        use = model.device.type == "cuda" if graphs is None else graphs
        self.graphs = StepGraphs(recorder or GraphRecorder.for_device(model.device)) if use else None
        self._buffers: dict[int, _Buffers] = {}
        self._version = pool.version

    def run(self, tokens: torch.Tensor, caches: Sequence[KVCache], experts: ExpertBackend) -> torch.Tensor:
        """tokens [B] (one new token per cache, any device) -> [B, H] final hidden states (a view of a buffer
        that the next run overwrites); every cache advances by one."""
        n = len(caches)
        if tokens.numel() != n or any(c.pool is not self.pool for c in caches):
            raise ValueError(f"{tokens.numel()} tokens for {n} caches, all of which must be in this step's pool")
        for cache in caches:
            cache.reserve(1)
        if self.pool.version != self._version and self.graphs is not None:
            self.graphs.clear()  # the pool's tensors moved: the graphs point at the old ones
        self._version = self.pool.version
        b = bucket(n)
        buf = self._buffers_for(b)
        lengths = [c.length + 1 for c in caches]
        pad = b - n
        meta = torch.tensor([[c.slot for c in caches] + [self.pool.scratch] * pad, lengths + [1] * pad])  # [2, b]
        buf.slots.copy_(meta[0], non_blocking=True)
        buf.lengths.copy_(meta[1], non_blocking=True)
        buf.tokens[:n].copy_(tokens, non_blocking=True)
        span = min(self.pool.capacity, bucket(max(lengths), MIN_SPAN))
        whole = bool(getattr(experts, "capturable", False)) and self.graphs is not None
        stages = self._stages(buf, span)
        call = self._call(buf, n, experts, whole)
        if self.graphs is None:
            for j, stage in enumerate(stages):
                stage()
                if j < len(self.moe_layers):
                    call(j)
        else:
            self.graphs.run((b, span, id(experts) if whole else None), stages, call, whole)
        for cache in caches:
            cache.advance(1)
        return buf.out[:n]

    def _buffers_for(self, b: int) -> _Buffers:
        if b not in self._buffers:
            m = self.model
            device, hidden, k = m.device, m.spec.hidden_size, m.spec.top_k

            def zeros(*shape, dtype=m.dtype):
                return torch.zeros(shape, dtype=dtype, device=device)
            self._buffers[b] = _Buffers(
                tokens=zeros(b, dtype=torch.long), slots=torch.full((b,), self.pool.scratch, device=device),
                lengths=torch.ones(b, dtype=torch.long, device=device), h=zeros(b, hidden), x=zeros(b, hidden),
                ids=torch.full((b, k), -1, device=device), weights=zeros(b, k, dtype=torch.float32),
                shared=zeros(b, hidden), routed=zeros(b, hidden, dtype=torch.float32), out=zeros(b, hidden))
        return self._buffers[b]

    def _stages(self, buf: _Buffers, span: int) -> list[Callable[[], None]]:
        """The step's stages over `buf`: len(moe_layers) + 1 closures, each reading only buffers."""
        m = self.model
        eps = m.spec.rms_norm_eps
        bounds = [-1, *self.moe_layers, len(m.layers)]  # stage j runs the layers after bounds[j] up to bounds[j+1]

        def stage(j: int) -> None:
            batch = DecodeBatch(self.pool, buf.slots, buf.lengths, span)
            if j == 0:
                h = F.embedding(buf.tokens, m.embed_tokens)
            else:
                h = add_experts(buf.h, buf.routed, buf.shared if m.layers[bounds[j]].shared is not None else None)
            for layer in range(bounds[j] + 1, bounds[j + 1]):  # dense layers
                w = m.layers[layer]
                h = attention_residual(h, layer, w, m.attn, m.rope, eps, batch)
                h = h + swiglu(rms_norm(h, w.post_norm, eps), w.mlp)
            if bounds[j + 1] == len(m.layers):
                buf.out.copy_(rms_norm(h, m.final_norm, eps))
                return
            layer = bounds[j + 1]  # a MoE layer: up to its routed-expert call
            w = m.layers[layer]
            h = attention_residual(h, layer, w, m.attn, m.rope, eps, batch)
            x = rms_norm(h, w.post_norm, eps)
            weights, ids = route_tokens(x, w, m.router)
            real = buf.slots != self.pool.scratch  # [b] padding rows call no expert
            buf.ids.copy_(torch.where(real[:, None], ids, -1))
            buf.weights.copy_(weights)
            shared = shared_experts(x, w)
            if shared is not None:
                buf.shared.copy_(shared)
            buf.x.copy_(x)
            buf.h.copy_(h)

        return [lambda j=j: stage(j) for j in range(len(self.moe_layers) + 1)]

    def _call(self, buf: _Buffers, n: int, experts: ExpertBackend, whole: bool) -> Callable[[int], None]:
        """call(j): the j-th MoE layer's routed experts into buf.routed (all b rows when captured whole)."""
        rows = buf.ids.shape[0] if whole else n

        def call(j: int) -> None:
            layer = self.moe_layers[j]
            pending = start_experts(experts, layer, buf.x[:rows], buf.ids[:rows], buf.weights[:rows])
            buf.routed[:rows].copy_(pending.result())

        return call
