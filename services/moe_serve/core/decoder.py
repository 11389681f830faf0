"""One decoder layer of the MoE causal LMs: pre-norm attention, then a dense MLP or a MoE block.

The MoE block routes here and sends the routed experts to an ExpertBackend (in-process or expert
servers); shared experts, with or without their sigmoid gate, run here, while the routed experts are in
flight when the backend can start them without waiting (`submit`).
Legend: T = tokens, H = hidden size, E = routed experts, K = top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.attention import AttentionConfig, AttentionWeights, self_attention
from moe_serve.core.experts import ExpertBackend, ExpertWeights, start_experts, swiglu
from moe_serve.core.kv_batch import DecodeBatch, KVBatch
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


def route_tokens(x: torch.Tensor, w: DecoderLayerWeights, router: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H] -> (gate weights [T, K] float32, expert ids [T, K])."""
    return route(router_logits(x, w.router), router.top_k, router.norm_topk_prob, router.softmax_fp32)


def shared_experts(x: torch.Tensor, w: DecoderLayerWeights) -> torch.Tensor | None:
    """[T, H] -> [T, H] through the shared expert(s) (sigmoid-gated where the model has the gate), or None."""
    if w.shared is None:
        return None
    shared = swiglu(x, w.shared)
    return shared if w.shared_gate is None else torch.sigmoid(F.linear(x, w.shared_gate)) * shared


def add_experts(h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """h [T, H] + routed [T, H] float32 (cast to h's dtype) + shared: the MoE block's residual add."""
    out = routed.to(device=h.device, dtype=h.dtype)
    return h + (out if shared is None else out + shared)


def moe_block(x: torch.Tensor, layer: int, w: DecoderLayerWeights, router: RouterConfig,
              experts: ExpertBackend) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[T, H] -> (routed experts' sum [T, H] float32 through the backend, shared experts' [T, H] or None)."""
    weights, ids = route_tokens(x, w, router)  # [T, K] each
    pending = start_experts(experts, layer, x, ids, weights)  # an async backend runs them meanwhile
    shared = shared_experts(x, w)
    return pending.result(), shared


def attention_residual(h: torch.Tensor, layer: int, w: DecoderLayerWeights, attn: AttentionConfig,
                       rope: RotaryEmbedding, eps: float, batch: KVBatch | DecodeBatch) -> torch.Tensor:
    """h [T, H] -> h + attn(norm(h))."""
    return h + self_attention(rms_norm(h, w.input_norm, eps), w.attention, attn, rope, layer, batch)


def decoder_layer(h: torch.Tensor, layer: int, w: DecoderLayerWeights, attn: AttentionConfig,
                  router: RouterConfig, rope: RotaryEmbedding, eps: float, experts: ExpertBackend,
                  batch: KVBatch | DecodeBatch) -> torch.Tensor:
    """h [T, H] -> [T, H]: h + attn(norm(h)), then + mlp(norm(.))."""
    h = attention_residual(h, layer, w, attn, rope, eps, batch)
    x = rms_norm(h, w.post_norm, eps)
    if not w.is_moe:
        return h + swiglu(x, w.mlp)
    return add_experts(h, *moe_block(x, layer, w, router, experts))
