"""The codec: round trips, bf16 rounding equal to torch's, and errors that name the field."""

import numpy as np
import pytest
import torch

from moe_client import wire
from moe_serve.tensors import from_wire, to_wire


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_round_trip_exact(dtype):
    array = (np.random.default_rng().standard_normal((3, 5)) * 100).astype(dtype)
    assert np.array_equal(wire.decode(wire.encode(array, dtype)), array)


def test_bf16_rounds_like_torch():
    values = np.random.default_rng().standard_normal(10000).astype(np.float32) * 1e3
    ours = wire.decode(wire.encode(values, "bfloat16"))
    theirs = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert np.array_equal(ours, theirs)


def test_torch_side_round_trip_keeps_bf16():
    t = torch.randn(4, 6).to(torch.bfloat16)
    back = from_wire(to_wire(t), "x")
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    assert np.array_equal(wire.decode(to_wire(t)), t.float().numpy())


def test_e4m3_table_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    theirs = codes.view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(wire.E4M3_TABLE, theirs, equal_nan=True)


def test_errors_name_the_field():
    msg = wire.encode(np.ones((2, 3), np.float32))
    msg.shape[:] = [2, 4]
    with pytest.raises(wire.WireError, match=r"hidden: shape \[2, 4\] of float32 needs 32 bytes, got 24"):
        wire.check(msg, "hidden")
    msg.shape[:] = [-1, 3]
    with pytest.raises(wire.WireError, match="negative dimension"):
        wire.check(msg, "hidden")
    msg.shape[:] = [1 << 40, 1 << 40]
    with pytest.raises(wire.WireError, match="more than the limit"):
        wire.check(msg, "hidden")
