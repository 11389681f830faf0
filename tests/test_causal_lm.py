"""The causal LM core in-process (LocalExperts) against transformers and the DeepSeek reference."""

import pytest
import torch
from references import random_prompts, reference_logits

from moe_serve.checkpoint import Checkpoint
from moe_serve.models import load_reference

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek"]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prefill_and_decode_match_reference(causal_checkpoints, arch):
    path = causal_checkpoints[arch]
    model, experts = load_reference(Checkpoint(path))
    prompts = random_prompts(model.spec.vocab_size, [1, 6, 13])
    caches = [model.new_cache(2) for _ in prompts]  # small: the caches must grow on the way
    with torch.inference_mode():
        got = model.forward([torch.tensor(p) for p in prompts], caches, experts)
        # A decode step over all three sequences at once, each at its own position.
        nxt = [[int(torch.randint(0, model.spec.vocab_size, ()))] for _ in prompts]
        step = model.forward([torch.tensor(t) for t in nxt], caches, experts, last_only=True)
    want = reference_logits(path, [p + t for p, t in zip(prompts, nxt, strict=True)])
    for p, g, s, w in zip(prompts, got, step, want, strict=True):
        assert g.shape == (len(p), model.spec.vocab_size)
        assert (g - w[:-1]).abs().max() <= 1e-4
        assert (s - w[-1]).abs().max() <= 1e-4
    assert [c.length for c in caches] == [len(p) + 1 for p in prompts]


def test_bf16_dense_layers_stay_close(causal_checkpoints):
    path = causal_checkpoints["qwen2_moe"]
    ref, experts = load_reference(Checkpoint(path))
    bf16, _ = load_reference(Checkpoint(path), dtype=torch.bfloat16, expert_dtype=torch.float32)
    prompt = random_prompts(ref.spec.vocab_size, [12])[0]
    with torch.inference_mode():
        want = ref.forward([torch.tensor(prompt)], [ref.new_cache()], experts)[0]
        got = bf16.forward([torch.tensor(prompt)], [bf16.new_cache()], experts)[0]
    assert got.dtype == torch.float32
    # bf16 keeps ~3 significant digits per op through 3 layers; logits here have std ~4.
    assert (got - want).abs().mean() / want.std() < 3e-2


def test_tied_embeddings_use_embed_tokens(tmp_path):
    from hf_models import build_checkpoint

    path = build_checkpoint("mixtral", tmp_path / "tied", seed=int(torch.randint(0, 2**31, ())),
                            tie_word_embeddings=True)
    model, experts = load_reference(Checkpoint(path))
    assert model.lm_head is model.embed_tokens
    prompt = random_prompts(model.spec.vocab_size, [7])
    with torch.inference_mode():
        got = model.forward([torch.tensor(prompt[0])], [model.new_cache()], experts)[0]
    assert (got - reference_logits(path, prompt)[0]).abs().max() <= 1e-4
