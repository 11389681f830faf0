"""The zero-copy wire path end to end: standard protobuf clients, malformed bytes, wire dtypes, unix sockets."""

import dataclasses
import tempfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from moe_client import GatewayClient, wire
from moe_client.pb import experts_pb2, experts_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from moe_serve.expert_server.config import ExpertServerConfig
from moe_serve.expert_server.main import create_server
from moe_serve.gateway.config import GatewayConfig
from moe_serve.gateway.main import create_gateway
from moe_serve.model.synthetic import write_checkpoint
from tests.support.checkpoints import TINY
from tests.support.references import plain_torch, reference_forward


def test_standard_protobuf_clients_get_standard_answers(cluster, tiny_checkpoint):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    rng = np.random.default_rng()
    hidden = rng.standard_normal((5, 64), dtype=np.float32)
    ids = rng.integers(0, 4, size=(5, 2)).astype(np.int32)
    weights = rng.random((5, 2), dtype=np.float32)
    with grpc.insecure_channel(servers[0]) as channel:  # the generated stub: upb on both directions
        reply = experts_pb2_grpc.ExpertServiceStub(channel).RunExperts(experts_pb2.RunExpertsRequest(
            layer=1, hidden=wire.encode(hidden), expert_ids=wire.encode(ids), weights=wire.encode(weights)), timeout=10)
    assert isinstance(reply, experts_pb2.RunExpertsResponse) and reply.compute_seconds > 0
    assert np.abs(wire.decode(reply.output) - plain_torch(tiny_checkpoint, 1, hidden, ids, weights)).max() <= 1e-5
    with grpc.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = stub.Forward(gateway_pb2.ForwardRequest(hidden=wire.encode(hidden, "bfloat16"),
                                                        output_dtype=wire.FLOAT32), timeout=10)
    want = reference_forward(tiny_checkpoint, wire.decode(wire.encode(hidden, "bfloat16")))
    assert reply.hidden.dtype == wire.FLOAT32 and np.abs(wire.decode(reply.hidden) - want).max() <= 1e-5


def test_malformed_bytes_get_invalid_argument_and_server_stays_up(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint)
    with grpc.insecure_channel(server) as channel:
        raw = channel.unary_unary("/moe.v1.ExpertService/RunExperts", _registered_method=True)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x12\x40truncated", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "RunExpertsRequest: malformed protobuf" in err.value.details()
        bad_output = experts_pb2.RunExpertsRequest(
            layer=0, hidden=wire.encode(np.ones((1, 64), np.float32)), output_dtype=wire.INT32,
            expert_ids=wire.encode(np.zeros((1, 1), np.int32)), weights=wire.encode(np.ones((1, 1), np.float32)))
        with pytest.raises(grpc.RpcError) as err:
            experts_pb2_grpc.ExpertServiceStub(channel).RunExperts(bad_output, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output_dtype: int32" in err.value.details()
        assert experts_pb2_grpc.ExpertServiceStub(channel).GetInfo(experts_pb2.GetInfoRequest(), timeout=10).owned


# Largest distance from the fp32 reference per wire dtype, one MoE layer (so routing cannot flip):
# measured over 100 draws at 0, 9e-4, 7.7e-3 and 0.115 (fp8 keeps 3 mantissa bits); bounds ~4x that.
WIRE_TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2, "float8_e4m3": 0.4}


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("one-layer"), dataclasses.replace(TINY, num_hidden_layers=1))


@pytest.mark.parametrize("wire_dtype", list(WIRE_TOLERANCE))
def test_gateway_wire_dtypes(cluster, one_layer_checkpoint, wire_dtype):
    servers = [cluster.expert_server(one_layer_checkpoint, experts=e) for e in ("0-4", "5-7")]
    gateway = cluster.gateway(one_layer_checkpoint, servers, wire_dtype=wire_dtype)
    hidden = np.random.default_rng().standard_normal((3, 7, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    error = np.abs(got - reference_forward(one_layer_checkpoint, hidden))
    assert error.max() <= WIRE_TOLERANCE[wire_dtype]
    if wire_dtype != "float32":
        assert error.max() > 0  # the narrower wire dtype was really used


def test_unix_sockets_end_to_end(cluster, tiny_checkpoint):
    folder = Path(tempfile.mkdtemp(prefix="moe-uds-", dir="/tmp"))  # short: unix socket paths max ~107 bytes
    addresses = [f"unix:{folder}/expert{i}.sock" for i in range(2)]
    for address, experts in zip(addresses, ("0-3", "4-7"), strict=True):
        handle, _ = cluster.loop.run(create_server(ExpertServerConfig(checkpoint=str(tiny_checkpoint),
                                                                      experts=experts, host=address)))
        cluster.handles.append(handle)
    gateway_address = f"unix:{folder}/gateway.sock"
    config = GatewayConfig(checkpoint=str(tiny_checkpoint), servers=addresses, host=gateway_address,
                           connect_timeout=20.0)
    handle, servicer = cluster.loop.run(create_gateway(config))
    cluster.handles.append(handle)
    assert [s.address for s in servicer.info.servers] == addresses
    hidden = np.random.default_rng().standard_normal((4, 64), dtype=np.float32)
    with GatewayClient(gateway_address) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
