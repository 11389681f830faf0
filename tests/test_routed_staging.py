"""A device-routed call's places in its arena (gateway/routed_staging.py): the three inputs staged in one copy
where they lie end to end, one copy each otherwise; every place where the server's message says it is."""

import itertools

import numpy as np
import pytest
import torch

from moe_client import wire
from moe_serve.gateway.routed_staging import RoutedPlaces, routed_extra
from moe_serve.rpc.codec import TORCH_DTYPES
from moe_serve.rpc.shared_regions import Arena, aligned

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(rng, tokens: int, hidden: int, top_k: int, dtype: torch.dtype, device: str):
    x = torch.from_numpy(rng.standard_normal((tokens, hidden), dtype=np.float32)).to(device, dtype)
    ids = torch.from_numpy(rng.integers(0, 64, (tokens, top_k))).to(device)
    weights = torch.from_numpy(rng.random((tokens, top_k), dtype=np.float32)).to(device)
    return x, ids, weights


def _read(arena: Arena, message) -> torch.Tensor:
    """The tensor a server reads for `message`: its bytes at its offset in the arena."""
    return arena.view(message.offset - arena._start, message.dtype, tuple(message.shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [wire.FLOAT32, wire.BFLOAT16])
@pytest.mark.parametrize("layout", ["end to end", "odd hidden", "strided", "converted"])
def test_staged_inputs_are_where_the_messages_name_them(device, dtype, layout):
    rng = np.random.default_rng()
    tokens, top_k = int(rng.integers(1, 40)), int(rng.integers(1, 9))
    hidden = 2 * int(rng.integers(4, 100)) + (1 if layout == "odd hidden" else 0)
    if layout == "odd hidden" and dtype == wire.BFLOAT16:
        tokens |= 1  # T x H x 2 not a multiple of 8: the ids cannot follow the hidden states directly
    out_dtype = wire.FLOAT32
    size = aligned(tokens * hidden * TORCH_DTYPES[dtype].itemsize) + routed_extra(tokens, top_k) + tokens * hidden * 4
    arena = Arena(torch.device(device), size)
    try:
        arena.poison()
        places = RoutedPlaces.of(arena, dtype, out_dtype, tokens, hidden, top_k)
        assert RoutedPlaces.of(arena, dtype, out_dtype, tokens, hidden, top_k) is places  # made once per arena
        x, ids, weights = _inputs(rng, tokens, hidden, top_k, TORCH_DTYPES[dtype], device)
        if layout == "strided":
            x = torch.cat([x, x], dim=1)[:, ::2]
        if layout == "converted":
            x = x.to(torch.float16)
        places.stage(x, ids, weights)
        got = {name: _read(arena, message) for name, message in places.messages.items()}
        assert torch.equal(got["shared_hidden"], x.to(TORCH_DTYPES[dtype]))
        assert torch.equal(got["shared_expert_ids"], ids) and torch.equal(got["shared_weights"], weights)
        # end to end exactly when the ids can follow the hidden states 8-byte aligned
        assert (places.words is not None) == (tokens * hidden * TORCH_DTYPES[dtype].itemsize % 8 == 0)
        spans = sorted((m.offset, m.offset + m.shape[0] * m.shape[1] * TORCH_DTYPES[m.dtype].itemsize)
                       for m in places.messages.values())
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # no two places overlap
        assert spans[-1][1] <= arena._start + size
        assert torch.isnan(got["shared_output"]).all()  # the sums' place untouched by the staging
    finally:
        arena.close()
