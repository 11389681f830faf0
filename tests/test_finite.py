"""rpc/finite: the sum-first check says "finite" exactly when every element is, overflowing sums included."""

import pytest
import torch

from moe_serve.rpc.finite import all_finite, finite_hint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_agrees_with_the_elementwise_check(dtype):
    x = torch.randn(64, 96, dtype=torch.float32).to(dtype)
    assert all_finite(x) and bool(finite_hint(x))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[torch.randint(0, 64, ()), torch.randint(0, 96, ())] = bad
        assert not all_finite(y) and not bool(finite_hint(y))
    # Inf and -Inf together sum to NaN: still not finite.
    y = x.clone()
    y[0, 0], y[1, 1] = float("inf"), float("-inf")
    assert not all_finite(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_values_whose_sum_overflows_are_finite(dtype):
    """The sum overflows float32, the hint cannot prove it, and the full check finds every element finite."""
    big = torch.finfo(torch.float32).max / 2
    x = torch.full((8, 16), big, dtype=torch.float64).to(dtype)
    assert torch.isfinite(x).all()
    assert not bool(finite_hint(x))
    assert all_finite(x) and all_finite(x, finite_hint(x))
