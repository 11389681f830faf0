"""DeepSeek-MoE (model_type "deepseek", remote code on the hub): a tiny checkpoint written with the hub's
tensor names, and an independent plain-torch reference of its modeling code (no moe_serve imports).

Semantics taken from DeepSeek's modeling_deepseek.py: Llama attention with RoPE; a layer is MoE iff
layer >= first_k_dense_replace and layer % moe_layer_freq == 0; MoEGate: softmax in the model dtype,
top-k, renormalised only if top_k > 1 and norm_topk_prob; shared experts (width n_shared_experts *
moe_intermediate_size) added without a gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "attention_bias": False,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 48, "initializer_range": 0.02, "intermediate_size": 64,
    "max_position_embeddings": 96, "moe_intermediate_size": 16, "moe_layer_freq": 2, "n_routed_experts": 8,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4, "num_experts_per_tok": 3,
    "num_hidden_layers": 5, "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-6,
    "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.36.0", "use_cache": True,
    "vocab_size": 160,
}


def is_moe(config: dict, layer: int) -> bool:
    return layer >= config["first_k_dense_replace"] and layer % config["moe_layer_freq"] == 0


def random_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the model under its hub name, drawn at random."""
    g = torch.Generator().manual_seed(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    mi, e = config["moe_intermediate_size"], config["n_routed_experts"]

    def rnd(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def mlp(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.gate_proj.weight": rnd(width, h), f"{prefix}.up_proj.weight": rnd(width, h),
                f"{prefix}.down_proj.weight": rnd(h, width)}

    t = {"model.embed_tokens.weight": rnd(v, h, scale=1.0), "model.norm.weight": 1 + rnd(h, scale=0.2),
         "lm_head.weight": rnd(v, h, scale=4.0 / h ** 0.5)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = 1 + rnd(h, scale=0.2)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + rnd(h, scale=0.2)
        t[f"{p}.self_attn.q_proj.weight"] = rnd(heads * d, h)
        t[f"{p}.self_attn.k_proj.weight"] = rnd(kv * d, h)
        t[f"{p}.self_attn.v_proj.weight"] = rnd(kv * d, h)
        t[f"{p}.self_attn.o_proj.weight"] = rnd(h, heads * d)
        if is_moe(config, layer):
            t[f"{p}.mlp.gate.weight"] = rnd(e, h, scale=3.0 / h ** 0.5)
            for expert in range(e):
                t.update(mlp(f"{p}.mlp.experts.{expert}", mi))
            t.update(mlp(f"{p}.mlp.shared_experts", mi * config["n_shared_experts"]))
        else:
            t.update(mlp(f"{p}.mlp", config["intermediate_size"]))
    return t


def write_checkpoint(path: Path, seed: int, config: dict | None = None, sharded: bool = True) -> Path:
    """config.json plus safetensors (two shards and model.safetensors.index.json, or one file)."""
    config = config or CONFIG
    path.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(config, seed)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, tensor in tensors.items():
        shards["model-0000{}-of-00002.safetensors".format(2 if ".experts." in name else 1)][name] = tensor
    for fname, part in shards.items():
        save_file(part, str(path / fname), metadata={"format": "pt"})
    weight_map = {name: fname for fname, part in shards.items() for name in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


class DeepseekReference:
    """DeepSeek-MoE's forward pass over one whole sequence, written out plainly (no KV cache)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        self.c = config
        self.t = tensors

    def _norm(self, x, name):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.t[name] * (x.float() * torch.rsqrt(var + self.c["rms_norm_eps"])).to(x.dtype)

    def _mlp(self, x, prefix):
        t = self.t
        return F.silu(x @ t[f"{prefix}.gate_proj.weight"].T) * (x @ t[f"{prefix}.up_proj.weight"].T) \
            @ t[f"{prefix}.down_proj.weight"].T

    def _attention(self, x, p):
        n, h = x.shape
        heads, kv = self.c["num_attention_heads"], self.c["num_key_value_heads"]
        d = h // heads
        q = (x @ self.t[f"{p}.q_proj.weight"].T).view(n, heads, d).transpose(0, 1)
        k = (x @ self.t[f"{p}.k_proj.weight"].T).view(n, kv, d).transpose(0, 1)
        v = (x @ self.t[f"{p}.v_proj.weight"].T).view(n, kv, d).transpose(0, 1)
        inv_freq = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(n).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()

        def rot(t):
            return torch.cat((-t[..., d // 2:], t[..., :d // 2]), dim=-1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(heads // kv, dim=0), v.repeat_interleave(heads // kv, dim=0)
        scores = q @ k.transpose(1, 2) / d ** 0.5
        scores = scores + torch.full((n, n), float("-inf")).triu(1)
        out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return out.transpose(0, 1).reshape(n, heads * d) @ self.t[f"{p}.o_proj.weight"].T

    def _moe(self, x, p):
        k = self.c["num_experts_per_tok"]
        scores = (x @ self.t[f"{p}.gate.weight"].T).softmax(dim=-1)  # in the model dtype, as MoEGate does
        weight, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
        if k > 1 and self.c["norm_topk_prob"]:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(x)
        for token in range(x.shape[0]):
            for j in range(k):
                y[token] += weight[token, j] * self._mlp(x[token:token + 1], f"{p}.experts.{int(idx[token, j])}")[0]
        return y + self._mlp(x, f"{p}.shared_experts")

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[n, V] logits at every position of `ids`."""
        h = self.t["model.embed_tokens.weight"][torch.tensor(ids)]
        for layer in range(self.c["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            h = h + self._attention(self._norm(h, f"{p}.input_layernorm.weight"), f"{p}.self_attn")
            x = self._norm(h, f"{p}.post_attention_layernorm.weight")
            h = h + (self._moe(x, f"{p}.mlp") if is_moe(self.c, layer) else self._mlp(x, f"{p}.mlp"))
        return self._norm(h, "model.norm.weight") @ self.t["lm_head.weight"].T

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation, recomputing the whole sequence at each step."""
        out = list(ids)
        for _ in range(new_tokens):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(ids):]
