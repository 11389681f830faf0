"""What a checkpoint's config.json says about its architecture, for each supported model_type.

One frozen `ModelSpec` per checkpoint: dimensions, which layers are MoE, routing semantics and
the tensor names of experts and routers. Both the expert servers and the gateway read it; it
never touches tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("simple_moe", "deepseek", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class ConfigError(ValueError):
    """A config.json that cannot be served: names the offending field."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one checkpoint, normalised across model types."""

    model_type: str
    hidden_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_width: int
    # Renormalise the top-k gate weights to sum to 1.
    norm_topk_prob: bool
    # DeepSeek runs the router softmax in the model dtype; the others in float32.
    router_softmax_fp32: bool = True
    rms_norm_eps: float = 1e-6
    torch_dtype: str = "float32"
    # Decoder (absent for simple_moe, which is a stack of norm + MoE blocks).
    has_attention: bool = False
    vocab_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    rope_theta: float = 10000.0
    attention_bias: bool = False
    # None, "head" (qwen3_moe: per-head RMSNorm on q and k) or "full" (olmoe: over all heads).
    qk_norm: str | None = None
    # Width of the dense MLP of non-MoE layers.
    dense_width: int = 0
    # Shared experts: total width (0 for none) and whether a sigmoid gate scales them (qwen2_moe).
    shared_expert_width: int = 0
    shared_expert_gated: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    def is_moe_layer(self, layer: int) -> bool:
        """True if `layer` has routed experts."""
        return layer in self.moe_layers

    @property
    def _moe_prefix(self) -> str:
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    def router_name(self, layer: int) -> str:
        """Tensor name of the router (gate) weight [E, H] of a MoE layer."""
        return f"model.layers.{layer}.{self._moe_prefix}.gate.weight"

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Tensor names of one routed expert: (gate [I, H], up [I, H], down [H, I])."""
        base = f"model.layers.{layer}.{self._moe_prefix}.experts.{expert}"
        if self.model_type == "mixtral":
            return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
        return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"

    def is_expert_tensor(self, name: str) -> bool:
        """True for the tensors of routed experts, which only expert servers load."""
        return f".{self._moe_prefix}.experts." in name


def _get(config: dict[str, Any], *keys: str, default: Any = None, required: bool = True) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is None and required:
        raise ConfigError(f"config.json: missing field {' / '.join(repr(k) for k in keys)}")
    return default


def _rope_theta(config: dict[str, Any]) -> float:
    # Hub configs keep rope_theta at the top level; transformers 5 nests it in rope_parameters.
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _decoder_fields(config: dict[str, Any]) -> dict[str, Any]:
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    return {
        "has_attention": True,
        "vocab_size": int(_get(config, "vocab_size")),
        "num_heads": heads,
        "num_kv_heads": int(_get(config, "num_key_value_heads", default=heads)),
        "head_dim": int(_get(config, "head_dim", default=hidden // heads)),
        "rope_theta": _rope_theta(config),
        "attention_bias": bool(_get(config, "attention_bias", default=False, required=False)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(config.get("max_position_embeddings", 4096)),
    }


def _sparse_step_layers(config: dict[str, Any], num_layers: int, num_experts: int) -> tuple[int, ...]:
    # qwen2_moe / qwen3_moe: layer l is sparse unless listed in mlp_only_layers, every decoder_sparse_step.
    only_dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    return tuple(
        layer for layer in range(num_layers)
        if layer not in only_dense and num_experts > 0 and (layer + 1) % step == 0
    )


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    """Parse a config.json dict; raises ConfigError naming the field that is missing or wrong."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = int(_get(config, "hidden_size"))
    num_layers = int(_get(config, "num_hidden_layers"))
    common = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_layers": num_layers,
        "top_k": int(_get(config, "num_experts_per_tok")),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "torch_dtype": str(config.get("torch_dtype") or config.get("dtype") or "float32"),
    }
    if model_type == "simple_moe":
        experts = int(_get(config, "num_experts"))
        spec = ModelSpec(
            **common, moe_layers=tuple(range(num_layers)), num_experts=experts,
            expert_width=int(_get(config, "intermediate_size")),
            norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        )
    elif model_type == "deepseek":
        experts = int(_get(config, "n_routed_experts"))
        first_dense = int(config.get("first_k_dense_replace", 0) or 0)
        freq = int(config.get("moe_layer_freq", 1) or 1)
        shared = int(config.get("n_shared_experts") or 0)
        width = int(_get(config, "moe_intermediate_size"))
        spec = ModelSpec(
            **common, **_decoder_fields(config),
            moe_layers=tuple(l for l in range(num_layers) if l >= first_dense and l % freq == 0),
            num_experts=experts, expert_width=width,
            norm_topk_prob=bool(config.get("norm_topk_prob", False)), router_softmax_fp32=False,
            dense_width=int(_get(config, "intermediate_size")), shared_expert_width=shared * width,
        )
        if config.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"config.json: scoring_func {config['scoring_func']!r} unsupported; only 'softmax'")
    elif model_type == "mixtral":
        experts = int(_get(config, "num_local_experts"))
        spec = ModelSpec(
            **common, **_decoder_fields(config), moe_layers=tuple(range(num_layers)),
            num_experts=experts, expert_width=int(_get(config, "intermediate_size")), norm_topk_prob=True,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(_get(config, "num_experts", "num_local_experts"))
        fields = _decoder_fields(config)
        if model_type == "qwen2_moe":
            fields["attention_bias"] = bool(config.get("qkv_bias", True))
        spec = ModelSpec(
            **common, **fields, moe_layers=_sparse_step_layers(config, num_layers, experts),
            num_experts=experts, expert_width=int(_get(config, "moe_intermediate_size")),
            norm_topk_prob=bool(config.get("norm_topk_prob", model_type == "qwen3_moe")),
            qk_norm="head" if model_type == "qwen3_moe" else None,
            dense_width=int(config.get("intermediate_size") or 0),
            shared_expert_width=int(config.get("shared_expert_intermediate_size") or 0)
            if model_type == "qwen2_moe" else 0,
            shared_expert_gated=model_type == "qwen2_moe",
        )
    else:  # olmoe
        experts = int(_get(config, "num_experts"))
        spec = ModelSpec(
            **common, **_decoder_fields(config), moe_layers=tuple(range(num_layers)),
            num_experts=experts, expert_width=int(_get(config, "intermediate_size")),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)), qk_norm="full",
        )
    if spec.top_k < 1 or spec.top_k > spec.num_experts:
        raise ConfigError(f"config.json: num_experts_per_tok {spec.top_k} must be in 1..{spec.num_experts}")
    return spec
