"""One decoder layer of the MoE causal LMs: pre-norm attention, then a dense MLP or a MoE block.

The MoE block routes here and sends the routed experts to an ExpertBackend (in-process or expert
servers); shared experts, with or without their sigmoid gate, run here, while the routed experts are in
flight when the backend can start them without waiting (`submit`).
Legend: T = tokens, H = hidden size, E = routed experts, K = top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.attention import AttentionConfig, AttentionWeights, self_attention
from moe_serve.core.experts import ExpertBackend, ExpertWeights, start_experts, swiglu
from moe_serve.core.kv_cache import KVCache
from moe_serve.core.norms import rms_norm
from moe_serve.core.rotary import RotaryEmbedding
from moe_serve.core.routing import route, router_logits


@dataclass(frozen=True)
class RouterConfig:
    """Routing semantics of the MoE layers (see arch.ModelSpec)."""

    top_k: int
    norm_topk_prob: bool
    softmax_fp32: bool = True


@dataclass(frozen=True)
class DecoderLayerWeights:
    """Everything of one layer but its routed experts."""

    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    attention: AttentionWeights
    mlp: ExpertWeights | None = None  # dense layers: a SwiGLU MLP
    router: torch.Tensor | None = None  # MoE layers: [E, H]
    shared: ExpertWeights | None = None  # shared expert(s), one SwiGLU of their total width
    shared_gate: torch.Tensor | None = None  # qwen2_moe: [1, H], sigmoid-scales the shared expert

    @property
    def is_moe(self) -> bool:
        return self.router is not None


def moe_block(x: torch.Tensor, layer: int, w: DecoderLayerWeights, router: RouterConfig,
              experts: ExpertBackend) -> torch.Tensor:
    """[T, H] -> [T, H]: routed experts through the backend, plus the shared expert(s)."""
    weights, ids = route(router_logits(x, w.router), router.top_k, router.norm_topk_prob,
                         router.softmax_fp32)  # [T, K] each
    pending = start_experts(experts, layer, x, ids, weights)  # an async backend runs them meanwhile
    shared = None
    if w.shared is not None:
        shared = swiglu(x, w.shared)
        if w.shared_gate is not None:
            shared = torch.sigmoid(F.linear(x, w.shared_gate)) * shared
    out = pending.result().to(device=x.device, dtype=x.dtype)  # [T, H]
    return out if shared is None else out + shared


def decoder_layer(h: torch.Tensor, layer: int, w: DecoderLayerWeights, attn: AttentionConfig,
                  router: RouterConfig, rope: RotaryEmbedding, eps: float, experts: ExpertBackend,
                  caches: Sequence[KVCache], lengths: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
    """h [T, H] -> [T, H]: h + attn(norm(h)), then + mlp(norm(.))."""
    x = rms_norm(h, w.input_norm, eps)
    h = h + self_attention(x, w.attention, attn, rope, layer, caches, lengths, positions)
    x = rms_norm(h, w.post_norm, eps)
    return h + (moe_block(x, layer, w, router, experts) if w.is_moe else swiglu(x, w.mlp))
