"""config.json -> ModelSpec: hub-style and transformers-5-style configs agree, and defaults follow transformers."""

import pytest
import transformers as tf

from moe_serve.model.config import ConfigError, spec_from_config
from tests.support.hf_models import ARCHS, hf_config

DEFAULT_CONFIGS = {"mixtral": tf.MixtralConfig, "qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig,
                   "olmoe": tf.OlmoeConfig}
DEEPSEEK_MOE_16B = {  # config.json of deepseek-ai/deepseek-moe-16b-base
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "max_position_embeddings": 4096, "model_type": "deepseek",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 28,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
    "scoring_func": "softmax", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 102400,
}


def hub_style(config: dict) -> dict:
    """What the hub's config.json files look like: top-level rope_theta, torch_dtype, qwen3 num_experts."""
    out = dict(config)
    out["rope_theta"] = out.pop("rope_parameters")["rope_theta"]
    out["torch_dtype"] = out.pop("dtype")
    if out["model_type"] == "qwen3_moe":
        out["num_experts"] = out.pop("num_local_experts")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_hub_and_new_style_configs_agree(arch):
    new = hf_config(arch, rope_parameters={"rope_type": "default", "rope_theta": 123456.0}).to_dict()
    spec = spec_from_config(new)
    assert spec == spec_from_config(hub_style(new))
    assert spec.rope_theta == 123456.0 and spec.num_experts == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_defaults_follow_transformers(arch):
    """A config.json that leaves a field out means what transformers' default means."""
    full = DEFAULT_CONFIGS[arch]().to_dict()
    model_fields = {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
                    "num_experts_per_tok", "num_key_value_heads"}
    minimal = {k: v for k, v in full.items() if k in model_fields}
    spec = spec_from_config(minimal)
    hf = DEFAULT_CONFIGS[arch](**{k: v for k, v in minimal.items() if k != "model_type"})
    assert spec.rope_theta == hf.rope_parameters["rope_theta"]
    assert spec.norm_topk_prob == (True if arch == "mixtral" else hf.norm_topk_prob)
    assert spec.attention_bias == bool(getattr(hf, "qkv_bias", getattr(hf, "attention_bias", False)))
    assert spec.tie_word_embeddings == hf.tie_word_embeddings
    assert spec.max_position_embeddings == hf.max_position_embeddings


def test_deepseek_moe_16b():
    spec = spec_from_config(DEEPSEEK_MOE_16B)
    assert spec.moe_layers == tuple(range(1, 28)) and spec.num_experts == 64 and spec.top_k == 6
    assert spec.expert_width == 1408 and spec.dense_width == 10944 and spec.shared_expert_width == 2816
    assert not spec.shared_expert_gated and not spec.norm_topk_prob and not spec.router_softmax_fp32
    assert spec.head_dim == 128 and spec.num_kv_heads == 16 and spec.rope_theta == 10000
    assert spec.eos_token_ids == (100001,)
    assert spec.expert_names(5, 63)[0] == "model.layers.5.mlp.experts.63.gate_proj.weight"
    assert spec.shared_expert_prefix(5) == "model.layers.5.mlp.shared_experts"


def test_deepseek_layer_selection_and_top1():
    spec = spec_from_config({**DEEPSEEK_MOE_16B, "num_hidden_layers": 8, "first_k_dense_replace": 2,
                             "moe_layer_freq": 3, "num_experts_per_tok": 1, "norm_topk_prob": True})
    assert spec.moe_layers == (3, 6)
    assert not spec.norm_topk_prob  # MoEGate renormalises only when top_k > 1


def test_qwen_sparse_step_and_mlp_only_layers():
    config = {**hf_config("qwen2_moe").to_dict(), "num_hidden_layers": 6, "decoder_sparse_step": 2,
              "mlp_only_layers": [3]}
    assert spec_from_config(config).moe_layers == (1, 5)


@pytest.mark.parametrize("change,message", [
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'dynamic'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
])
def test_unsupported_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config({**hf_config("qwen3_moe").to_dict(), **change})
