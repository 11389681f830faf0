"""Grouped expert compute equals the one-expert-at-a-time reference, on every path the bank takes."""

import pytest
import torch

from moe_serve.core.experts import ExpertWeights, combine
from moe_serve.core.grouped import StackedExperts, grouped_supported, grouped_swiglu, looped_swiglu
from moe_serve.core.routing import route
from moe_serve.expert_server.bank import ExpertBank, assign_devices


def random_experts(ids, h, i, gen, dtype=torch.float32):
    return {e: ExpertWeights(torch.randn(i, h, generator=gen) / h**0.5, torch.randn(i, h, generator=gen) / h**0.5,
                             torch.randn(h, i, generator=gen) / i**0.5).to(dtype=dtype) for e in ids}


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_grouped_and_looped_agree(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    experts = random_experts(range(4), 32, 48, gen)
    stacked = StackedExperts.stack(experts)
    x = torch.randn(sum(counts), 32, generator=gen)
    counts_t = torch.tensor(counts)
    want = torch.cat([combine(x[sum(counts[:s]):sum(counts[:s + 1])],
                              torch.full((c, 1), s), torch.ones(c, 1), experts) for s, c in enumerate(counts)])
    assert torch.allclose(looped_swiglu(x, counts_t, stacked), want, atol=1e-5)
    if grouped_supported(torch.device("cpu"), torch.float32):
        assert torch.allclose(grouped_swiglu(x, counts_t, stacked), want, atol=1e-5)


CASES = [(["cpu"], torch.float32, 1e-5), (["cpu"], torch.bfloat16, 3e-2)]
if torch.cuda.is_available():  # the GPU runs (docs/benchmarks.md) add these; CI has no GPU
    CASES += [(["cuda:0"], torch.bfloat16, 3e-2), (["cuda:0", "cpu"], torch.float32, 1e-4),
              ([f"cuda:{i}" for i in range(torch.cuda.device_count())], torch.bfloat16, 3e-2)]


@pytest.mark.parametrize("devices,dtype,tol", CASES)
def test_bank_equals_reference(devices, dtype, tol):
    gen = torch.Generator().manual_seed(11)
    owned = [1, 2, 4, 6, 7]
    experts = random_experts(owned, 64, 80, gen)
    device_of = assign_devices(owned, [torch.device(d) for d in devices])
    bank = ExpertBank({(3, e): w.to(device_of[e], dtype) for e, w in experts.items()}, num_experts=8,
                      hidden_size=64, dtype=dtype)
    assert bank.devices() == list(dict.fromkeys(devices))
    for tokens in (37, 20, 37, 300):  # same CUDA-graph bucket twice, shorter after longer, then a new one
        hidden = torch.randn(tokens, 64, generator=gen)
        weights, ids = route(torch.randn(tokens, 8, generator=gen), 3, renormalize=True)
        ids = torch.where(torch.isin(ids, torch.tensor(owned)), ids, -1)  # the gateway sends only owned ids
        got, _ = bank.run(3, hidden, ids, weights)
        want = combine(hidden, ids, weights, experts)
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item()), tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels run on GPUs only (the lent H100 run)")
def test_fused_kernels_match_torch():
    from moe_serve.core import triton_moe

    gen = torch.Generator(device="cuda").manual_seed(7)
    gate_up = torch.randn(300, 2 * 1408, device="cuda", generator=gen).to(torch.bfloat16)
    scale = torch.rand(300, device="cuda", generator=gen)
    gate, up = gate_up.float().split(1408, dim=-1)
    want = torch.nn.functional.silu(gate) * up * scale[:, None]
    got = triton_moe.swiglu_scale(gate_up, scale).float()
    assert ((got - want).norm() / want.norm()) < 1e-2
    t, k = 50, 6
    y = torch.randn(t * k, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    order = torch.randperm(t * k, device="cuda", generator=gen)
    valid = torch.rand(t * k, device="cuda", generator=gen) > 0.3
    pairs = torch.empty_like(y).index_copy_(0, order, y).float()
    pairs[~valid] = 0
    want = pairs.view(t, k, -1).sum(1)
    assert torch.allclose(triton_moe.gather_sum(y, order, valid, t, k), want, atol=1e-4)


def test_in_process_backend_equals_bank(tiny_checkpoint):
    from moe_serve.expert_server.bank import InProcessExperts
    from moe_serve.model.checkpoint import Checkpoint
    from moe_serve.model.loader import load_all_experts
    from moe_serve.model.placement import resolve_ownership

    checkpoint = Checkpoint(tiny_checkpoint)
    bank = ExpertBank.load(checkpoint, resolve_ownership(checkpoint.spec, "all"), [torch.device("cpu")],
                           torch.float32)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(21, 64, generator=gen)
    weights, ids = route(torch.randn(21, 8, generator=gen), 2, renormalize=True)
    want = load_all_experts(checkpoint).run(1, hidden, ids, weights)
    assert torch.allclose(InProcessExperts(bank).run(1, hidden, ids, weights), want, atol=1e-5)
