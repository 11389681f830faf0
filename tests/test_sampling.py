"""The sampler: greedy, temperature, top-k, top-p and seeds, against their definitions."""

import torch

from moe_serve.core.generation import SamplingParams, sample_next


def draws(logits, n=400, **kw):
    params = SamplingParams(max_new_tokens=1, **kw)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    return [sample_next(logits, params, gen) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(50)
    assert draws(logits, n=3) == [int(logits.argmax())] * 3


def test_top_k_keeps_only_the_k_best():
    logits = torch.randn(50)
    best = set(torch.topk(logits, 3).indices.tolist())
    seen = set(draws(logits, temperature=5.0, top_k=3))
    assert seen <= best and len(seen) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(logits, temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(logits, temperature=1.0, top_p=0.4)) == {0}


def test_sampling_follows_the_softmax():
    probs = torch.tensor([0.6, 0.3, 0.1])
    counts = torch.bincount(torch.tensor(draws(probs.log(), n=3000, temperature=1.0)), minlength=3).float()
    # 3000 draws: a binomial's std is at most 0.009 here; 5 sigma.
    assert (counts / 3000 - probs).abs().max() < 0.045


def test_seed_reproduces():
    logits = torch.randn(100)
    params = SamplingParams(max_new_tokens=1, temperature=2.0, seed=5)

    def run():
        gen = torch.Generator().manual_seed(5)
        return [sample_next(logits, params, gen) for _ in range(20)]

    assert run() == run()


def test_vanishing_temperature_is_greedy_not_nan():
    logits = torch.randn(50) * 10
    assert set(draws(logits, n=20, temperature=1.4e-45)) == {int(logits.argmax())}
    assert set(draws(logits, n=20, temperature=1e-30, top_p=0.5)) == {int(logits.argmax())}
