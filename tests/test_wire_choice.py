"""Wire dtypes per direction and per call size (gateway/wire_choice.py), through real expert servers."""

import dataclasses

import numpy as np
import pytest
import torch

from moe_client import GatewayClient, wire, zerocopy
from moe_serve.expert_server.servicer import ExpertServicer
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.gateway.wire_choice import WireChoice
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference
from moe_serve.model.synthetic import write_checkpoint
from moe_serve.rpc.codec import from_wire
from moe_serve.rpc.side_channel import SideLink
from tests.support.calls import run_experts
from tests.support.checkpoints import TINY


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


@pytest.mark.parametrize("tcp_calls", [True, False])
def test_bf16_to_the_experts_fp32_back(cluster, tmp_path, monkeypatch, tcp_calls):
    """One MoE layer, so the served and the reference inputs are the same fp32 numbers before their bf16
    rounding: with a second layer, sums added in another order (~1e-6 apart) can round a layer-1 input to
    the neighbouring bf16 value (2^-8 apart), which once moved an output by 2e-4. Over gRPC and over the
    TCP side channel alike (the server records what it is sent)."""
    tiny_checkpoint = write_checkpoint(tmp_path / "one-layer", dataclasses.replace(TINY, num_hidden_layers=1))
    seen = []
    prepare = ExpertServicer.prepare

    def recording(self, request):
        seen.append((request.hidden.shape[0], request.hidden.dtype, request.output_dtype))
        return prepare(self, request)

    monkeypatch.setattr(ExpertServicer, "prepare", recording)
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, tcp_calls=tcp_calls,
                              wire_dtype="bfloat16",
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


def _run_experts_request(rng, tokens: int, output_dtype: int):
    hidden = rng.standard_normal((tokens, 64), dtype=np.float32)
    return zerocopy.RunExpertsRequest(
        layer=1, hidden=wire.encode_view(hidden), output_dtype=output_dtype,
        expert_ids=wire.encode_view(rng.integers(0, 8, (tokens, 2)).astype(np.int32)),
        weights=wire.encode_view(rng.random((tokens, 2), dtype=np.float32)))


@pytest.mark.parametrize("path", ["grpc", "tcp side channel"])
def test_fp8_replies_are_scaled_per_row_on_both_paths(cluster, tiny_checkpoint, path):
    """output_dtype float8_e4m3: the reply's sums are e4m3 codes with a float32 scale per row (row amax / 448);
    each element within its rounding of the float32 reply: half an ulp of 3 mantissa bits (2^-4 relative), or
    in the subnormal range half of 2^-9 in units of the scale."""
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    rng = np.random.default_rng()
    tokens = int(rng.integers(1, 40))
    request = _run_experts_request(rng, tokens, wire.FLOAT32)
    if path == "grpc":
        def call(r):
            return run_experts(server, r)
    else:
        link = SideLink(f"127.0.0.1:{cluster.expert_servicers[server].side.tcp_port}", tcp=True)

        def call(r):
            return zerocopy.RunExpertsResponse.FromString(link.receive(link.send(r._type.chunks(r)[0]), 10))
    exact = from_wire(call(request).output, "output").numpy().copy()
    request.output_dtype = wire.FLOAT8_E4M3
    reply = call(request)
    assert reply.output.dtype == wire.FLOAT8_E4M3 and list(reply.output.shape) == [tokens, 64]
    got = from_wire(reply.output, "output").numpy()
    scale = np.abs(exact).max(axis=1, keepdims=True) / 448
    assert np.all(np.abs(got - exact) <= 2 ** -4 * np.abs(exact) + scale * 2 ** -10 + 1e-6 * np.abs(exact))
