"""RunExperts called directly: correct sums, and bad requests get a status code and leave the server well."""

import grpc
import numpy as np
import pytest

from moe_client import ExpertClient, wire
from moe_client.pb import experts_pb2, experts_pb2_grpc
from tests.support.references import plain_torch


@pytest.fixture
def server(cluster, tiny_checkpoint):
    return cluster.expert_server(tiny_checkpoint, experts="2-5")


def test_run_experts_matches_plain_torch(server, tiny_checkpoint):
    rng = np.random.default_rng()
    hidden = rng.standard_normal((9, 64), dtype=np.float32)
    ids = rng.integers(2, 6, size=(9, 3)).astype(np.int32)
    ids[0, 1] = -1
    weights = rng.random((9, 3), dtype=np.float32)
    with ExpertClient(server) as client:
        got = client.run_experts(1, hidden, ids, weights)
        info = client.info()
    assert np.abs(got - plain_torch(tiny_checkpoint, 1, hidden, ids, weights)).max() <= 1e-5
    assert [(o.layer, list(o.experts)) for o in info.owned] == [(0, [2, 3, 4, 5]), (1, [2, 3, 4, 5])]
    assert info.compute_dtype == wire.FLOAT32


def request(hidden=None, ids=None, weights=None, layer=0):
    """A RunExperts request; `hidden` may be an array or a ready Tensor message."""
    if hidden is None:
        hidden = np.random.default_rng().standard_normal((4, 64), dtype=np.float32)
    hidden_msg = hidden if not isinstance(hidden, np.ndarray) else wire.encode(hidden)
    ids = np.full((hidden_msg.shape[0], 2), 3, dtype=np.int32) if ids is None else ids
    weights = np.full(ids.shape, 0.5, dtype=np.float32) if weights is None else weights
    return experts_pb2.RunExpertsRequest(layer=layer, hidden=hidden_msg, expert_ids=wire.encode(ids),
                                         weights=wire.encode(weights))


def _bad_shape_bytes():
    t = wire.encode(np.ones((4, 64), np.float32))
    t.shape[:] = [4, 65]
    return t


BAD = {
    "wrong dtype": (lambda: request(hidden=np.ones((4, 64), np.int32)), "INVALID_ARGUMENT", "dtype int32"),
    "wrong hidden size": (lambda: request(hidden=np.ones((4, 32), np.float32)), "INVALID_ARGUMENT", "[4, 32]"),
    "shape/bytes disagree": (lambda: request(hidden=_bad_shape_bytes()), "INVALID_ARGUMENT", "needs 1040 bytes"),
    "unknown layer": (lambda: request(layer=7), "NOT_FOUND", "layer 7"),
    "unknown expert": (lambda: request(ids=np.array([[3, 6]] * 4, np.int32)), "NOT_FOUND", "experts 6"),
    "empty batch": (lambda: request(hidden=np.ones((0, 64), np.float32), ids=np.ones((0, 2), np.int32)),
                    "INVALID_ARGUMENT", "empty batch"),
    "ids/weights mismatch": (lambda: request(weights=np.ones((4, 3), np.float32)), "INVALID_ARGUMENT", "[4, 3]"),
    "ids rows mismatch": (lambda: request(ids=np.full((3, 2), 3, np.int32)), "INVALID_ARGUMENT", "[3, 2]"),
    "negative id": (lambda: request(ids=np.full((4, 2), -5, np.int32)), "INVALID_ARGUMENT", "-5"),
    "nan hidden": (lambda: request(hidden=np.full((4, 64), np.nan, np.float32)), "INVALID_ARGUMENT", "NaN"),
    "unknown dtype enum": (lambda: request(hidden=_unknown_dtype()), "INVALID_ARGUMENT", "unknown dtype 99"),
}


def _unknown_dtype():
    t = wire.encode(np.ones((4, 64), np.float32))
    t.dtype = 99
    return t




@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_status_and_server_stays_well(server, tiny_checkpoint, case):
    make, code, needle = BAD[case]
    channel = grpc.insecure_channel(server)
    stub = experts_pb2_grpc.ExpertServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.RunExperts(make(), timeout=10)
    assert err.value.code().name == code, err.value.details()
    assert needle in err.value.details()
    # the same server then answers a valid request correctly
    rng = np.random.default_rng()
    hidden = rng.standard_normal((3, 64), dtype=np.float32)
    ids = np.array([[2, 5], [3, -1], [4, 4]], np.int32)
    weights = rng.random((3, 2), dtype=np.float32)
    with ExpertClient(server) as client:
        got = client.run_experts(0, hidden, ids, weights)
    assert np.abs(got - plain_torch(tiny_checkpoint, 0, hidden, ids, weights)).max() <= 1e-5
    channel.close()
