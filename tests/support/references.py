"""The answers tests check against, computed without the services' transport: the in-process model for
Forward, the checkpoint's tensors token by token for RunExperts, and transformers (or the independent
DeepSeek reference) for the causal models' logits and greedy continuations."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference


def reference_forward(checkpoint_dir, hidden: np.ndarray) -> np.ndarray:
    """Forward of a simple_moe checkpoint in this process, every expert local, `hidden` ([..., H]) alone."""
    model, experts = load_reference(Checkpoint(checkpoint_dir))
    with torch.inference_mode():
        flat = torch.from_numpy(hidden).reshape(-1, hidden.shape[-1])
        return model.forward(flat, experts).reshape(hidden.shape).numpy()


def check_forward(client, checkpoint_dir, tokens: int = 12) -> None:
    """One Forward of random hidden states through `client` (a GatewayClient) equals reference_forward."""
    hidden_size = Checkpoint(checkpoint_dir).spec.hidden_size
    hidden = np.random.default_rng().standard_normal((tokens, hidden_size), dtype=np.float32)
    got, want = client.forward(hidden), reference_forward(checkpoint_dir, hidden)
    error = np.abs(got - want)
    # A failure says how: rounding (errors near 1e-5 everywhere) or a wrong sum (whole rows off, or zeros).
    assert error.max() <= 1e-5, (f"max error {error.max():.3g} (|reference| up to {np.abs(want).max():.3g}); rows "
                                 f"off by > 1e-5: {np.flatnonzero(error.max(axis=1) > 1e-5).tolist()}; zero rows "
                                 f"returned: {np.flatnonzero(~got.any(axis=1)).tolist()}")


def plain_torch(checkpoint_dir, layer, hidden, ids, weights):
    """RunExperts' answer token by token, straight from the checkpoint's tensors."""
    ckpt = Checkpoint(checkpoint_dir)
    out = np.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        x = torch.from_numpy(hidden[t])
        for e, w in zip(ids[t], weights[t], strict=True):
            if e < 0:
                continue
            g, u, d = (ckpt.load(n) for n in ckpt.spec.expert_names(layer, int(e)))
            out[t] += float(w) * (d @ (torch.nn.functional.silu(g @ x) * (u @ x))).numpy()
    return out


@cache
def _model(path: Path):
    config = json.loads((path / "config.json").read_text())
    if config["model_type"] == "deepseek":
        from tests.support.deepseek_ref import DeepseekReference

        tensors = {}
        for f in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(f))
        return DeepseekReference(config, tensors)
    from tests.support.hf_models import load_hf

    return load_hf(path)


def reference_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[n_i, V] float32 logits at every position of each prompt, computed one prompt at a time."""
    model = _model(path)
    if hasattr(model, "greedy"):
        return [model.logits(p).float() for p in prompts]
    from tests.support.hf_models import hf_logits

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


def reference_logprobs(path: Path, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[T, V] log_softmax of the reference's float32 logits at the positions that chose each generated token."""
    logits = reference_logits(path, [prompt + generated[:-1]])[0]  # [n + T - 1, V]
    return logits[len(prompt) - 1:].log_softmax(-1)


def check_logprobs(ref: torch.Tensor, tokens: list[int], chosen: list[float], tops: list[list[tuple[int, float]]],
                   k: int, tol: float = 1e-4) -> None:
    """Each step's chosen log-prob and k alternatives equal the reference `ref` [T, V] to `tol`: the alternatives'
    values are the reference's k largest (ids may swap only between values closer than `tol`)."""
    assert len(tokens) == len(chosen) == len(tops) == ref.shape[0]
    for step, (token, lp, top) in enumerate(zip(tokens, chosen, tops, strict=True)):
        assert abs(lp - float(ref[step, token])) <= tol, (step, lp, float(ref[step, token]))
        assert len(top) == k
        best = ref[step].topk(k).values.tolist()
        for (tid, tlp), want in zip(top, best, strict=True):
            assert abs(tlp - want) <= tol and abs(tlp - float(ref[step, tid])) <= tol, (step, top, best)
