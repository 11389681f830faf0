"""Reference logits and greedy continuations of the causal test checkpoints: transformers, or DeepSeek's reference."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file


@cache
def _model(path: Path):
    config = json.loads((path / "config.json").read_text())
    if config["model_type"] == "deepseek":
        from deepseek_ref import DeepseekReference

        tensors = {}
        for f in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(f))
        return DeepseekReference(config, tensors)
    from hf_models import load_hf

    return load_hf(path)


def reference_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[n_i, V] float32 logits at every position of each prompt, computed one prompt at a time."""
    model = _model(path)
    if hasattr(model, "greedy"):
        return [model.logits(p).float() for p in prompts]
    from hf_models import hf_logits

    return hf_logits(model, prompts)


def reference_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation: transformers' generate (KV cache in use), or the DeepSeek reference."""
    model = _model(path)
    if hasattr(model, "greedy"):
        return model.greedy(prompt, new_tokens)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        # An explicit mask: without one, generate() infers it from pad_token_id and would mask prompt tokens 0.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def random_prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    """Fresh random token ids."""
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]
