"""What outside tools and protobuf clients expect: server reflection v1 as well as v1alpha, and the hand-written
codec accepting and refusing exactly what protobuf does (field number 0 refused, groups skipped)."""

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from moe_client import wire, zerocopy
from moe_client.pb import experts_pb2
from moe_client.wire import WireError
from tests.support.references import plain_torch


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services(cluster, tiny_checkpoint, version):
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server])
    for address, service in ((server, "moe.v1.ExpertService"), (gateway, "moe.v1.GatewayService")):
        with grpc.insecure_channel(address) as channel:
            info = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            replies = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            names = {s.name for s in replies[0].list_services_response.service}
            assert {service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
            # And the service's descriptor, as grpcurl's `describe` asks for it.
            replies = list(info(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]),
                                timeout=10))
            assert replies[0].file_descriptor_response.file_descriptor_proto


def _valid() -> tuple[bytes, tuple]:
    rng = np.random.default_rng()
    hidden = rng.standard_normal((3, 64), dtype=np.float32)
    ids = rng.integers(0, 8, (3, 2)).astype(np.int32)
    weights = rng.random((3, 2), dtype=np.float32)
    request = experts_pb2.RunExpertsRequest(layer=1, hidden=wire.encode(hidden), expert_ids=wire.encode(ids),
                                            weights=wire.encode(weights))
    return request.SerializeToString(), (1, hidden, ids, weights)


GROUP = bytes([0x7B, 0x08, 0x05, 0x7C])  # field 15 as a group holding field 1 = 5
NESTED = bytes([0x7B, 0x83, 0x01, 0x10, 0x01, 0x84, 0x01, 0x7C])  # a group inside a group
FIELD_ZERO = bytes([0x00, 0x01])  # field 0, varint 1
CASES = {"a group": (GROUP, True), "nested groups": (NESTED, True), "field number 0": (FIELD_ZERO, False),
         "a group left open": (bytes([0x7B, 0x08, 0x05]), False), "an end without a start": (bytes([0x7C]), False)}


@pytest.mark.parametrize("case", list(CASES))
def test_the_codec_agrees_with_protobuf(case):
    extra, accepted = CASES[case]
    data, _ = _valid()
    for message in (data + extra, extra + data):
        try:
            experts_pb2.RunExpertsRequest.FromString(message)
            upb = True
        except Exception:
            upb = False
        assert upb == accepted  # what protobuf does, as the test states it
        if accepted:
            parsed = zerocopy.RunExpertsRequest.parse(message)
            assert bytes(parsed.hidden.data) == experts_pb2.RunExpertsRequest.FromString(message).hidden.data
        else:
            with pytest.raises(WireError):
                zerocopy.RunExpertsRequest.parse(message)


def test_a_server_answers_as_protobuf_would(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint)
    data, args = _valid()
    with grpc.insecure_channel(server) as channel:
        raw = channel.unary_unary("/moe.v1.ExpertService/RunExperts", request_serializer=None,
                                  response_deserializer=experts_pb2.RunExpertsResponse.FromString)
        reply = raw(data + GROUP, timeout=10)  # an unknown group is skipped
        assert np.abs(wire.decode(reply.output) - plain_torch(tiny_checkpoint, *args)).max() <= 1e-5
        with pytest.raises(grpc.RpcError) as err:
            raw(data + FIELD_ZERO, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "field number 0" in err.value.details()
