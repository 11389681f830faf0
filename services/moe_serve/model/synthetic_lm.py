"""The embedded causal LM: a tiny random qwen3_moe checkpoint with a tokenizer, written to disk.

Its weights are random, so the text it generates is gibberish: it exists to show and test the whole
serving path (prompt text -> tokens -> experts on servers -> log-probs -> streamed text, the chat
template, the OpenAI API) without a download. The files are the hub's layout (config.json,
model.safetensors with per-expert names, tokenizer.json, tokenizer_config.json with a ChatML chat
template), so transformers loads the directory too (AutoModelForCausalLM, AutoTokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_serve.model.config import spec_from_config
from moe_serve.model.tensor_shapes import dense_tensor_shapes, expert_tensor_shapes

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen's models use it, written over several lines so that rendering it exercises jinja's
# trim_blocks / lstrip_blocks the way transformers sets them.
CHAT_TEMPLATE = """{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('messages: role ' + message['role'] + ' is not system, user or assistant') }}
{% endif %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a tiny random model.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
# What the tokenizer is trained on (a few merges over bytes; any text still encodes, byte by byte).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Mixture of experts models route each token to a few experts.",
    "The gateway holds the router, attention and the dense layers.", "Expert servers run the routed experts.",
    "Hello! How are you today? I am a tiny random model, and my answers are gibberish.",
    "Once upon a time there was a cluster of machines that served a language model.",
    "user assistant system: what is the capital of France? Paris is the capital of France.",
]


@dataclass(frozen=True)
class SyntheticLMConfig:
    """Dimensions of the embedded causal LM (qwen3_moe): every decoder layer is a MoE layer."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 96
    max_position_embeddings: int = 2048
    max_vocab_size: int = 512  # the tokenizer's target: 256 bytes, merges and the specials (the corpus may give fewer)
    seed: int = 0

    def to_json(self, vocab_size: int, eos_token_id: int, pad_token_id: int) -> dict:
        """config.json contents, in the hub's qwen3_moe style (top-level rope_theta, num_experts)."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "torch_dtype": "float32",
            "vocab_size": vocab_size, "hidden_size": self.hidden_size, "intermediate_size": 2 * self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "attention_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size, "norm_topk_prob": True,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": None,
        }


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on CORPUS (deterministic), with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def random_tensors(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A tensor per name: norms near 1, decisive routers and logits, 1/sqrt(fan-in) elsewhere."""
    out = {}
    for name, shape in shapes.items():
        if "norm" in name:
            scale, offset = 0.2, 1.0
        elif name.endswith("mlp.gate.weight"):
            scale, offset = 3.0 / shape[-1] ** 0.5, 0.0
        elif name == "lm_head.weight":
            scale, offset = 4.0 / shape[-1] ** 0.5, 0.0
        elif name == "model.embed_tokens.weight":
            scale, offset = 1.0, 0.0
        else:
            scale, offset = 1.0 / shape[-1] ** 0.5, 0.0
        out[name] = offset + torch.randn(shape, generator=gen) * scale
    return out


def write_causal_lm(path: str | Path, cfg: SyntheticLMConfig = SyntheticLMConfig()) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(cfg.max_vocab_size)
    eos, pad = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config = cfg.to_json(tokenizer.get_vocab_size(), eos, pad)
    spec = spec_from_config(config)
    shapes = dict(dense_tensor_shapes(spec))
    for layer in spec.moe_layers:
        for expert in range(spec.num_experts):
            shapes.update(expert_tensor_shapes(spec, layer, expert))
    save_file(random_tensors(shapes, torch.Generator().manual_seed(cfg.seed)), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    return out
