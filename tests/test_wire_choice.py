"""Wire dtypes per direction and per call size (gateway/wire_choice.py), through real expert servers."""

import numpy as np
import pytest
import torch

from moe_client import GatewayClient, wire
from moe_client.striping import Lanes
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.gateway.wire_choice import WireChoice
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference


def test_choice_per_direction_and_size():
    choice = WireChoice(wire.FLOAT8_E4M3, wire.BFLOAT16, full_below_tokens=8)
    assert choice.for_call(7) == (wire.FLOAT32, wire.FLOAT32)
    assert choice.for_call(8) == (wire.FLOAT8_E4M3, wire.BFLOAT16)
    assert WireChoice(wire.BFLOAT16).for_call(1) == (wire.BFLOAT16, wire.BFLOAT16)  # back follows to_experts
    assert WireChoice.of("bf16", "").for_call(3) == (wire.BFLOAT16, wire.BFLOAT16)
    with pytest.raises(ValueError, match="-1"):
        WireChoice(full_below_tokens=-1)


class Bf16Inputs:
    """The experts of `inner` on hidden states rounded to bf16 (what a bf16 wire delivers), sums in fp32."""

    def __init__(self, inner):
        self.inner = inner

    def run(self, layer, hidden, expert_ids, weights):
        return self.inner.run(layer, hidden.bfloat16().float(), expert_ids, weights)


def test_bf16_to_the_experts_fp32_back(cluster, tiny_checkpoint, monkeypatch):
    seen = []
    call = Lanes.__call__

    async def recording(self, request, **kwargs):
        seen.append((request.hidden.shape[0], request.hidden.dtype, request.output_dtype))
        return await call(self, request, **kwargs)

    monkeypatch.setattr(Lanes, "__call__", recording)
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, wire_dtype="bfloat16",
                              reply_wire_dtype="float32", full_precision_below_tokens=3,
                              batching=BatchingConfig(batching=False))
    rng = np.random.default_rng()
    model, experts = load_reference(Checkpoint(tiny_checkpoint))
    with GatewayClient(gateway) as client:
        for tokens in (2, int(rng.integers(5, 60))):
            hidden = rng.standard_normal((tokens, 64), dtype=np.float32)
            got = client.forward(hidden)
            backend = experts if tokens < 3 else Bf16Inputs(experts)  # small calls go in fp32
            with torch.inference_mode():
                want = model.forward(torch.from_numpy(hidden), backend).numpy()
            assert np.abs(got - want).max() <= 1e-5
    assert {(t < 3, d, o) for t, d, o in seen} == {(True, wire.FLOAT32, wire.FLOAT32),
                                                   (False, wire.BFLOAT16, wire.FLOAT32)}
