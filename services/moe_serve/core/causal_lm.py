"""The MoE causal LMs (deepseek, mixtral, qwen2_moe, qwen3_moe, olmoe) in plain torch.

Tokens from several sequences run as one flat batch: attention keeps to each sequence and its own
KV cache, everything else (norms, router, experts) sees all tokens at once, so each MoE layer makes
one ExpertBackend call per step whatever the number of sequences.
Legend: T = tokens of the batch, H = hidden size, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_serve.core.attention import AttentionConfig, AttentionWeights
from moe_serve.core.decoder import DecoderLayerWeights, RouterConfig, decoder_layer
from moe_serve.core.experts import ExpertBackend, ExpertWeights
from moe_serve.core.kv_batch import KVBatch
from moe_serve.core.kv_cache import KVCache, KVPool
from moe_serve.core.norms import rms_norm
from moe_serve.core.rotary import RotaryEmbedding
from moe_serve.core.spec import ModelSpec


def _swiglu(tensors: Mapping[str, torch.Tensor], prefix: str) -> ExpertWeights:
    return ExpertWeights(*(tensors[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down")))


def _layer_weights(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], layer: int) -> DecoderLayerWeights:
    p = f"model.layers.{layer}"
    a = f"{p}.self_attn"
    get = tensors.get
    attention = AttentionWeights(
        q=tensors[f"{a}.q_proj.weight"], k=tensors[f"{a}.k_proj.weight"], v=tensors[f"{a}.v_proj.weight"],
        o=tensors[f"{a}.o_proj.weight"], q_bias=get(f"{a}.q_proj.bias"), k_bias=get(f"{a}.k_proj.bias"),
        v_bias=get(f"{a}.v_proj.bias"), o_bias=get(f"{a}.o_proj.bias"),
        q_norm=get(f"{a}.q_norm.weight"), k_norm=get(f"{a}.k_norm.weight"),
    )
    norms = {"input_norm": tensors[f"{p}.input_layernorm.weight"],
             "post_norm": tensors[f"{p}.post_attention_layernorm.weight"]}
    if not spec.is_moe_layer(layer):
        return DecoderLayerWeights(**norms, attention=attention, mlp=_swiglu(tensors, f"{p}.mlp"))
    shared = _swiglu(tensors, spec.shared_expert_prefix(layer)) if spec.shared_expert_width else None
    gate = tensors[f"{p}.mlp.shared_expert_gate.weight"] if shared is not None and spec.shared_expert_gated else None
    return DecoderLayerWeights(**norms, attention=attention, router=tensors[spec.router_name(layer)],
                               shared=shared, shared_gate=gate)


class CausalLM:
    """Embeddings, decoder layers, final norm and lm_head; routed experts run through an ExpertBackend."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: Sequence[DecoderLayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.dtype = dtype
        self.embed_tokens = embed  # [V, H]
        self.layers = list(layers)
        self.final_norm = final_norm  # [H]
        self.lm_head = lm_head  # [V, H]
        self.attn = AttentionConfig(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.qk_norm,
                                    spec.clip_qkv, spec.rms_norm_eps)
        self.router = RouterConfig(spec.top_k, spec.norm_topk_prob, spec.router_softmax_fp32)
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling_factor)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @classmethod
    def from_tensors(cls, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> CausalLM:
        """Build from name -> tensor holding layout.dense_tensor_shapes(spec), cast to `dtype` on `device`."""
        cast = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
        embed = cast["model.embed_tokens.weight"]
        lm_head = embed if spec.tie_word_embeddings else cast["lm_head.weight"]
        layers = [_layer_weights(spec, cast, layer) for layer in range(spec.num_layers)]
        return cls(spec, embed, layers, cast["model.norm.weight"], lm_head, dtype)

    def new_pool(self, slots: int = 1, capacity: int = 16) -> KVPool:
        """A KV pool for `slots` sequences of `capacity` tokens (it grows when asked for more)."""
        return KVPool(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.dtype, slots, capacity,
                      self.device)

    def new_cache(self, capacity: int = 16) -> KVCache:
        """An empty KV cache for one sequence alone, with room for `capacity` tokens before it grows.

        A batch of such caches stores and attends pool by pool; sequences that share a pool
        (`new_pool().allocate()`) do each in one op."""
        return self.new_pool(1, capacity).allocate()

    def new_caches(self, lengths: Sequence[int]) -> list[KVCache]:
        """Empty caches for sequences of up to lengths[i] tokens, sharing one pool: a step over them stores
        each layer's keys and values in one op."""
        pool = self.new_pool(len(lengths), max(lengths, default=1))
        return [pool.allocate() for _ in lengths]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 -> [T, H] on the model's device."""
        return F.embedding(token_ids.to(self.device), self.embed_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] final hidden states -> [..., V] float32 logits, on the CPU where sampling runs."""
        return F.linear(hidden.to(self.device, self.dtype), self.lm_head).float().cpu()

    def forward_hidden(self, hidden: torch.Tensor, caches: Sequence[KVCache], lengths: Sequence[int],
                       experts: ExpertBackend) -> torch.Tensor:
        """[T, H] embeddings of len(caches) sequences back to back (lengths[i] tokens each, continuing
        from each cache) -> [T, H] after every decoder layer and the final norm; the caches advance."""
        if sum(lengths) != hidden.shape[0] or len(lengths) != len(caches):
            raise ValueError(f"lengths {list(lengths)} do not split {hidden.shape[0]} tokens over {len(caches)} caches")
        for cache, n in zip(caches, lengths, strict=True):
            cache.reserve(n)
        batch = KVBatch(caches, lengths, self.device)
        h = hidden.to(self.device, self.dtype)
        for layer, weights in enumerate(self.layers):
            h = decoder_layer(h, layer, weights, self.attn, self.router, self.rope, self.spec.rms_norm_eps,
                              experts, batch)
        for cache, n in zip(caches, lengths, strict=True):
            cache.advance(n)
        return rms_norm(h, self.final_norm, self.spec.rms_norm_eps)

    def forward(self, token_ids: Sequence[torch.Tensor], caches: Sequence[KVCache], experts: ExpertBackend,
                last_only: bool = False) -> list[torch.Tensor]:
        """New tokens of each sequence ([n_i] int64) -> float32 logits [n_i, V] (or [V] if last_only) per sequence."""
        lengths = [int(t.numel()) for t in token_ids]
        hidden = self.forward_hidden(self.embed(torch.cat(list(token_ids))), caches, lengths, experts)
        if last_only:
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            return list(self.logits(hidden[ends]).unbind(0))
        return list(self.logits(hidden).split(lengths))
