"""Which tensors a checkpoint must hold besides its routed experts, with their shapes, per architecture.

The gateway loads exactly these (and checks each shape); `moe-serve inspect` sizes the dense part from them.
"""

from __future__ import annotations

from moe_serve.core.spec import ModelSpec

Shape = tuple[int, ...]


def _swiglu(prefix: str, hidden: int, width: int) -> dict[str, Shape]:
    return {f"{prefix}.gate_proj.weight": (width, hidden), f"{prefix}.up_proj.weight": (width, hidden),
            f"{prefix}.down_proj.weight": (hidden, width)}


def _attention(spec: ModelSpec, layer: int) -> dict[str, Shape]:
    p = f"model.layers.{layer}.self_attn"
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes: dict[str, Shape] = {f"{p}.q_proj.weight": (q, h), f"{p}.k_proj.weight": (kv, h),
                                f"{p}.v_proj.weight": (kv, h), f"{p}.o_proj.weight": (h, q)}
    if spec.attention_bias:
        shapes.update({f"{p}.q_proj.bias": (q,), f"{p}.k_proj.bias": (kv,), f"{p}.v_proj.bias": (kv,)})
    if spec.o_proj_bias:
        shapes[f"{p}.o_proj.bias"] = (h,)
    if spec.qk_norm == "head":
        shapes.update({f"{p}.q_norm.weight": (d,), f"{p}.k_norm.weight": (d,)})
    elif spec.qk_norm == "full":
        shapes.update({f"{p}.q_norm.weight": (q,), f"{p}.k_norm.weight": (kv,)})
    return shapes


def _mlp(spec: ModelSpec, layer: int) -> dict[str, Shape]:
    h = spec.hidden_size
    if not spec.is_moe_layer(layer):
        return _swiglu(f"model.layers.{layer}.mlp", h, spec.dense_width)
    shapes: dict[str, Shape] = {spec.router_name(layer): (spec.num_experts, h)}
    if spec.shared_expert_width:
        shapes.update(_swiglu(spec.shared_expert_prefix(layer), h, spec.shared_expert_width))
        if spec.shared_expert_gated:
            shapes[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = (1, h)
    return shapes


def dense_tensor_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """name -> shape of every tensor the gateway needs: all but the routed experts."""
    h = spec.hidden_size
    if not spec.has_attention:  # simple_moe: a pre-norm and a router per MoE layer, then a final norm
        shapes = {f"model.layers.{layer}.input_layernorm.weight": (h,) for layer in spec.moe_layers}
        shapes.update({spec.router_name(layer): (spec.num_experts, h) for layer in spec.moe_layers})
        return {**shapes, "model.norm.weight": (h,)}
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for layer in range(spec.num_layers):
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (h,)
        shapes.update(_attention(spec, layer))
        shapes.update(_mlp(spec, layer))
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def expert_tensor_shapes(spec: ModelSpec, layer: int, expert: int) -> dict[str, Shape]:
    """name -> shape of one routed expert's three tensors."""
    h, i = spec.hidden_size, spec.expert_width
    return dict(zip(spec.expert_names(layer, expert), ((i, h), (i, h), (h, i)), strict=True))
