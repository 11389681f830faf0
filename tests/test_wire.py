"""The codec: round trips, bf16 rounding equal to torch's, and errors that name the field."""

import numpy as np
import pytest
import torch

from moe_client import wire
from moe_serve.rpc.codec import from_wire, to_wire, to_wire_owned


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


def test_empty_shapes_that_numpy_cannot_hold_are_refused():
    """No elements and no bytes, but numpy refuses these shapes (the fuzz test found the first one:
    INTERNAL "array is too big" from the gateway's Forward)."""
    empty = wire.encode(np.ones((0, 3), np.float32))
    for shape, text in (([2, 64, 26, 512, 0, 0, 8064, 0, 0, 8064, 8064, 8064], "beside a zero dimension"),
                        ([1] * 40 + [0], "41 dimensions, more than the limit 32")):
        empty.shape[:] = shape
        with pytest.raises(wire.WireError, match=text):
            wire.check(empty, "hidden")
    empty.shape[:] = [1 << 20, 0, 1 << 10]  # within the limit: an empty array of that shape
    assert wire.decode(empty, "hidden").shape == (1 << 20, 0, 1 << 10)


def _e4m3_probe_values() -> torch.Tensor:
    """Every grid point, every midpoint between neighbours (ties), random values, zeros of both signs."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2
    rand = (torch.rand(4000) - 0.5) * torch.logspace(-4, 2.6, 4000)
    return torch.cat([grid, -grid, mids, -mids, rand, torch.tensor([0.0, -0.0])])


def test_fp8_numpy_quantiser_equals_torch_cast():
    # A row whose amax is 448 has scale 1, so the codes are exactly torch's cast of the values.
    values = _e4m3_probe_values()
    row = torch.cat([values, torch.tensor([448.0])])[None]
    codes, scales = wire.quantize_e4m3(row.numpy())
    assert scales.tolist() == [1.0]
    assert np.array_equal(codes, row.to(torch.float8_e4m3fn).view(torch.uint8).numpy())


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 17), (4, 0), (0, 8)])
def test_fp8_per_row_scales_both_sides_agree(shape):
    t = torch.randn(shape) * torch.logspace(-3, 3, shape[0] or 1).reshape(-1, *[1] * (len(shape) - 1))[: shape[0]]
    if t.numel():
        t.reshape(-1, shape[-1])[0] = 0  # an all-zero row gets scale 1
    ours_np = wire.encode_view(t.numpy(), "fp8")
    ours_torch = to_wire(t, wire.FLOAT8_E4M3)
    assert bytes(ours_np.data) == bytes(ours_torch.data) and bytes(ours_np.scales) == bytes(ours_torch.scales)
    back = from_wire(ours_torch, "x")
    assert back.shape == t.shape and back.dtype == torch.float32
    assert np.array_equal(wire.decode(ours_np), back.numpy())
    if t.numel():
        rows = t.reshape(-1, shape[-1])
        scales = torch.frombuffer(bytearray(ours_torch.scales), dtype=torch.float32)
        expected = (rows / scales[:, None]).to(torch.float8_e4m3fn).float() * scales[:, None]
        assert torch.equal(back.reshape(rows.shape), expected)
        # e4m3 keeps 3 mantissa bits: within 1/16 of each row's largest value after scaling
        assert ((back - t).abs().reshape(rows.shape) <= rows.abs().amax(1, keepdim=True) / 16 + 1e-30).all()


@pytest.mark.parametrize("dtype", [wire.FLOAT32, wire.BFLOAT16, wire.FLOAT16])
def test_torch_round_trip_matches_torch_casts(dtype):
    t = torch.randn(6, 10) * 50
    back = from_wire(to_wire(t, dtype), "x")
    cast = t.to({wire.FLOAT32: torch.float32, wire.BFLOAT16: torch.bfloat16, wire.FLOAT16: torch.float16}[dtype])
    assert back.dtype == cast.dtype and torch.equal(back, cast)
    assert np.array_equal(wire.decode(to_wire(t, dtype)), cast.float().numpy())


def test_to_wire_borrows_and_from_wire_views():
    t = torch.randn(8, 16)
    view = to_wire(t)
    assert np.shares_memory(np.frombuffer(view.data, np.float32), t.numpy())  # no copy on the way out
    buffer = bytes(view.data)
    back = from_wire(wire.WireTensor(view.dtype, view.shape, memoryview(buffer)), "x")
    start = np.frombuffer(buffer, np.uint8).ctypes.data
    assert back.data_ptr() == start and torch.equal(back, t)  # no copy on the way in


def test_unknown_output_dtype_is_refused():
    with pytest.raises(wire.WireError, match="not supported"):
        to_wire(torch.ones(2, 2), 99)


@pytest.mark.parametrize("dtype", [wire.FLOAT32, wire.BFLOAT16, wire.FLOAT8_E4M3])
def test_to_wire_owned_never_borrows(dtype):
    # The expert server encodes the GPU bank's reused pinned output with it: the reply must survive
    # the buffer being overwritten by the next call.
    t = torch.randn(8, 16)
    want = bytes(to_wire(t, dtype).data)
    owned = to_wire_owned(t, dtype)
    t.fill_(7.0)
    assert bytes(owned.data) == want
