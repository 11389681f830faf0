"""The core math against a dense, token-by-token reference; the core stays free of gRPC."""

import subprocess
import sys

import pytest
import torch

from moe_serve.core.experts import ExpertWeights, LocalExperts, combine, swiglu
from moe_serve.core.routing import route


def random_experts(n: int, h: int, i: int, gen: torch.Generator) -> dict[int, ExpertWeights]:
    return {e: ExpertWeights(torch.randn(i, h, generator=gen) / h**0.5, torch.randn(i, h, generator=gen) / h**0.5,
                             torch.randn(h, i, generator=gen) / i**0.5) for e in range(n)}


def token_by_token(hidden, ids, weights, experts):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                w = experts[e]
                x = hidden[t:t + 1]
                y = (torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T
                out[t] += weights[t, k] * y[0]
    return out


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_combine_matches_token_by_token(tokens):
    gen = torch.Generator().manual_seed(tokens)
    experts = random_experts(6, 32, 48, gen)
    hidden = torch.randn(tokens, 32, generator=gen)
    weights, ids = route(torch.randn(tokens, 6, generator=gen), top_k=3, renormalize=True)
    ids[::3, 1] = -1  # some unused slots
    got = combine(hidden, ids, weights, experts)
    want = token_by_token(hidden, ids, weights, experts)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_combine_runs_each_expert_once(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    experts = random_experts(4, 16, 16, gen)
    calls = []
    import moe_serve.core.experts as mod

    def counting(x, w):
        calls.append(x.shape[0])
        return swiglu(x, w)

    monkeypatch.setattr(mod, "swiglu", counting)
    weights, ids = route(torch.randn(50, 4, generator=gen), top_k=2, renormalize=False)
    combine(torch.randn(50, 16, generator=gen), ids, weights, experts)
    assert len(calls) == len(torch.unique(ids)) and sum(calls) == 100


def test_route_renormalises_and_orders():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 8, generator=gen)
    w, ids = route(logits, 2, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(20))
    assert torch.equal(ids, logits.topk(2).indices)
    w_raw, _ = route(logits, 2, renormalize=False)
    assert torch.allclose(w_raw, logits.softmax(-1).topk(2).values)


def test_local_experts_by_layer():
    gen = torch.Generator().manual_seed(5)
    experts = random_experts(3, 8, 8, gen)
    backend = LocalExperts({(2, e): w for e, w in experts.items()})
    hidden = torch.randn(5, 8, generator=gen)
    w, ids = route(torch.randn(5, 3, generator=gen), 2, True)
    assert torch.equal(backend.run(2, hidden, ids, w), combine(hidden, ids, w, experts))


def test_core_does_not_import_grpc():
    code = ("import sys, moe_serve.core.experts, moe_serve.core.routing, moe_serve.core.simple_model, "
            "moe_serve.core.causal_lm, moe_serve.core.generation; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'moe_client')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
