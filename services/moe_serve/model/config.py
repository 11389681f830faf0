"""What a checkpoint's config.json says about its architecture, for each supported model_type: a `ModelSpec`.

Both the expert servers and the gateway read it. Field semantics follow transformers 5.x (mixtral, qwen2_moe, qwen3_moe,
olmoe) and DeepSeek's own modeling code (deepseek, remote code); both the hub's config.json style
(top-level `rope_theta`, qwen3 `num_experts`) and transformers 5's (`rope_parameters`,
`num_local_experts`) are read.
"""

from __future__ import annotations

from typing import Any

from moe_serve.core.spec import ModelSpec

SUPPORTED_MODEL_TYPES = ("simple_moe", "deepseek", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Base of the rotary frequencies when a config names none (transformers' `default_theta`).
_DEFAULT_THETA = {"mixtral": 1_000_000.0}
# Context length when a config names none (the configuration classes' defaults).
_DEFAULT_MAX_POSITIONS = {"deepseek": 2048, "mixtral": 131072, "qwen2_moe": 32768, "qwen3_moe": 32768, "olmoe": 4096}


class ConfigError(ValueError):
    """A config.json that cannot be served: names the offending field."""


def _get(config: dict[str, Any], *keys: str, default: Any = None, required: bool = True) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is None and required:
        raise ConfigError(f"config.json: missing field {' / '.join(repr(k) for k in keys)}")
    return default


def _rope(config: dict[str, Any], model_type: str) -> tuple[float, float]:
    """(rope_theta, linear scaling factor), with transformers' precedence: rope_parameters, then top level."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_parameters {params!r} is not an object")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("config.json: per-layer-type rope_parameters are not supported")
    theta = params.get("rope_theta", config.get("rope_theta", _DEFAULT_THETA.get(model_type, 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(_get(params, "factor"))
    raise ConfigError(f"config.json: rope type {kind!r} unsupported; supported: 'default', 'linear'")


def _eos(config: dict[str, Any]) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _decoder_fields(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} unsupported; only 'silu'")
    if config.get("use_sliding_window") or (model_type == "mixtral" and config.get("sliding_window")):
        raise ConfigError("config.json: sliding-window attention (use_sliding_window / sliding_window) is unsupported")
    theta, factor = _rope(config, model_type)
    bias = bool(config.get("attention_bias", False))
    vocab = int(_get(config, "vocab_size"))
    eos = _eos(config)
    bad = [e for e in eos if not 0 <= e < vocab]
    return {
        "has_attention": True,
        "vocab_size": vocab,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        # olmoe sizes its q/k norms by hidden_size, so its heads are hidden // heads wide.
        "head_dim": hidden // heads if model_type == "olmoe"
        else int(_get(config, "head_dim", default=hidden // heads)),
        "rope_theta": theta,
        "rope_scaling_factor": factor,
        "attention_bias": bias,
        "o_proj_bias": bias and model_type != "mixtral",
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(config.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[model_type]),
        # An eos id outside the vocabulary (olmoe's default 50279 in a tiny model) can never be generated.
        "eos_token_ids": tuple(e for e in eos if e not in bad),
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
        if config.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"config.json: scoring_func {config['scoring_func']!r} unsupported; only 'softmax'")
        spec = ModelSpec(
            **common, **_decoder_fields(config, model_type),
            moe_layers=tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0),
            num_experts=experts, expert_width=width,
            # MoEGate renormalises only when top_k > 1 and norm_topk_prob (false for DeepSeek-MoE-16B).
            norm_topk_prob=bool(config.get("norm_topk_prob", False)) and common["top_k"] > 1,
            router_softmax_fp32=False,
            dense_width=int(_get(config, "intermediate_size")), shared_expert_width=shared * width,
        )
    elif model_type == "mixtral":
        experts = int(_get(config, "num_local_experts", "num_experts"))
        spec = ModelSpec(
            **common, **_decoder_fields(config, model_type), moe_layers=tuple(range(num_layers)),
            num_experts=experts, expert_width=int(_get(config, "intermediate_size")), norm_topk_prob=True,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(_get(config, "num_experts", "num_local_experts"))
        fields = _decoder_fields(config, model_type)
        if model_type == "qwen2_moe":  # q/k/v carry a bias (qkv_bias, default true); o_proj never does
            fields.update(attention_bias=bool(config.get("qkv_bias", True)), o_proj_bias=False)
        spec = ModelSpec(
            **common, **fields, moe_layers=_sparse_step_layers(config, num_layers, experts),
            num_experts=experts, expert_width=int(_get(config, "moe_intermediate_size")),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            qk_norm="head" if model_type == "qwen3_moe" else None,
            dense_width=int(config.get("intermediate_size") or 0),
            shared_expert_width=int(config.get("shared_expert_intermediate_size") or 0)
            if model_type == "qwen2_moe" else 0,
            shared_expert_gated=model_type == "qwen2_moe",
        )
    else:  # olmoe
        experts = int(_get(config, "num_experts", "num_local_experts"))
        clip = config.get("clip_qkv")
        spec = ModelSpec(
            **common, **_decoder_fields(config, model_type), moe_layers=tuple(range(num_layers)),
            num_experts=experts, expert_width=int(_get(config, "intermediate_size")),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)), qk_norm="full",
            clip_qkv=None if clip is None else float(clip),
        )
    if spec.top_k < 1 or spec.top_k > spec.num_experts:
        raise ConfigError(f"config.json: num_experts_per_tok {spec.top_k} must be in 1..{spec.num_experts}")
    if len(spec.moe_layers) < spec.num_layers and spec.has_attention and spec.dense_width <= 0:
        raise ConfigError("config.json: missing field 'intermediate_size' (width of the dense MLP layers)")
    return spec
