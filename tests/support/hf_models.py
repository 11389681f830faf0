"""Tiny random checkpoints of the transformers MoE architectures, written with save_pretrained.

Every parameter is redrawn after construction: some (routers) start at zero, and every token would then tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
COMMON = dict(vocab_size=160, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=96, rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)


def hf_config(arch: str, **overrides):
    """A transformers config of `arch` with tiny dimensions and each architecture's optional parts switched on."""
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 32, "num_local_experts": 8,
                                   "num_experts_per_tok": 2, **overrides})
    if arch == "qwen2_moe":  # shared expert with its gate, q/k/v bias, a dense layer via mlp_only_layers
        return tf.Qwen2MoeConfig(**{**COMMON, "intermediate_size": 40, "moe_intermediate_size": 24,
                                    "shared_expert_intermediate_size": 32, "num_experts": 8,
                                    "num_experts_per_tok": 2, "mlp_only_layers": [1], **overrides})
    if arch == "qwen3_moe":  # per-head q/k norms, head_dim != hidden / heads, renormalised top-k, o_proj bias
        return tf.Qwen3MoeConfig(**{**COMMON, "intermediate_size": 40, "moe_intermediate_size": 24,
                                    "num_experts": 8, "num_experts_per_tok": 3, "head_dim": 16,
                                    "norm_topk_prob": True, "attention_bias": True, "mlp_only_layers": [0],
                                    **overrides})
    if arch == "olmoe":  # q/k norms over all heads, clipped q/k/v
        return tf.OlmoeConfig(**{**COMMON, "intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                 "clip_qkv": 2.5, **overrides})
    raise ValueError(arch)


@torch.no_grad()
def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter: norms near 1, decisive routers, widely spread logits."""
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():
        def draw(scale: float, _p=p) -> torch.Tensor:
            return torch.randn(_p.shape, generator=generator) * scale
        if "norm" in name:
            p.copy_(1.0 + draw(0.2))
        elif name.endswith("bias"):
            p.copy_(draw(0.2))
        elif name.endswith("mlp.gate.weight") or "block_sparse_moe.gate" in name:
            p.copy_(draw(3.0 / hidden ** 0.5))
        elif "lm_head" in name:
            p.copy_(draw(4.0 / hidden ** 0.5))
        elif "embed_tokens" in name:
            p.copy_(draw(1.0))
        else:
            p.copy_(draw(1.0 / p.shape[-1] ** 0.5))


def build_checkpoint(arch: str, path: Path, seed: int, sharded: bool = False, hub_style: bool = False,
                     **overrides) -> Path:
    """Write a random `arch` checkpoint to `path` (optionally sharded, optionally with a hub-style config.json)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    randomise(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    if hub_style:
        to_hub_style(path)
    return path


def to_hub_style(path: Path) -> None:
    """Rewrite config.json the way hub checkpoints have it: top-level rope_theta, torch_dtype, qwen3 num_experts."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["torch_dtype"] = config.pop("dtype")
    if config["model_type"] == "qwen3_moe":
        config["num_experts"] = config.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(config, indent=2))


def load_hf(path: Path):
    """The transformers model of a checkpoint directory, eager experts and attention, in eval mode."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager",
                                                    attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def hf_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits at every position, one prompt at a time (no padding)."""
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]
