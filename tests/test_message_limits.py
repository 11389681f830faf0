"""Message sizes derived from the model, replies refused before compute, and refused requests' memory given back
(real processes: the point is what a server's resident memory does)."""

import time

import grpc
import numpy as np
import pytest

from moe_client import ExpertClient, GatewayClient, wire, zerocopy
from moe_client.channel import TRANSPORT_OPTIONS
from moe_serve.rpc.message_limits import SLACK_BYTES, message_limit
from moe_serve.rpc.options import ServingOptions
from tests.support.calls import run_experts
from tests.support.launch import launch
from tests.support.references import plain_torch, reference_forward
from tests.support.waiting import wait_for

H, TOP_K = 64, 2  # the tiny checkpoint


def _raw(address: str, method: str):
    channel = grpc.insecure_channel(address, options=TRANSPORT_OPTIONS)
    return channel, channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def _forward_bytes(tokens: int) -> bytes:
    hidden = np.random.default_rng().standard_normal((tokens, H), dtype=np.float32)
    return zerocopy.ForwardRequest(hidden=wire.encode_view(hidden)).SerializeToString()


def _run_experts_bytes(tokens: int, nan: bool = False) -> bytes:
    rng = np.random.default_rng()
    hidden = rng.standard_normal((tokens, H), dtype=np.float32)
    if nan:
        hidden[rng.integers(tokens), rng.integers(H)] = np.nan
    return zerocopy.RunExpertsRequest(
        layer=0, hidden=wire.encode_view(hidden),
        expert_ids=wire.encode_view(rng.integers(0, 8, (tokens, TOP_K)).astype(np.int64)),
        weights=wire.encode_view(rng.random((tokens, TOP_K), dtype=np.float32))).SerializeToString()


def test_message_limit_follows_the_model_and_max_tokens(tiny_checkpoint, tmp_path, processes):
    max_tokens = 4096
    limit = message_limit(H, TOP_K, max_tokens)
    server = launch("expert-server", tmp_path / "e.log", checkpoint=tiny_checkpoint, experts="all",
                    max_tokens=max_tokens)
    gateway = launch("gateway", tmp_path / "g.log", checkpoint=tiny_checkpoint, servers=[server.address],
                     max_tokens=max_tokens)
    processes += [server, gateway]
    server.wait_ready()
    gateway.wait_ready()
    for address, method in ((server.address, "/moe.v1.ExpertService/RunExperts"),
                            (gateway.address, "/moe.v1.GatewayService/Forward")):
        channel, raw = _raw(address, method)
        with channel, pytest.raises(grpc.RpcError) as err:
            raw(b"\x00" * (limit + 1), timeout=30)  # refused by size alone, before it is parsed
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"vs. {limit})" in err.value.details(), err.value.details()
    # The largest valid calls fit: max_tokens tokens, through the gateway and straight to the server.
    hidden = np.random.default_rng().standard_normal((max_tokens, H), dtype=np.float32)
    with GatewayClient(gateway.address) as client:
        assert np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    ids = np.random.default_rng().integers(0, 8, (max_tokens, TOP_K))
    weights = np.random.default_rng().random((max_tokens, TOP_K), dtype=np.float32)
    with ExpertClient(server.address) as client:
        got = client.run_experts(1, hidden, ids, weights)
    assert np.abs(got - plain_torch(tiny_checkpoint, 1, hidden, ids, weights)).max() <= 1e-5
    assert len(_run_experts_bytes(max_tokens)) <= limit - SLACK_BYTES


def _rss_after(service, calls: int, send) -> tuple[float, float]:
    """RSS (MiB) before and after `calls` refused calls, once the server has had a moment to free them."""
    send()  # one first: buffers and code paths warmed up
    time.sleep(0.5)
    before = service.rss_mib()
    for _ in range(calls):
        send()
    time.sleep(0.5)
    return before, service.rss_mib()


def _run_experts_refused(tokens: int, how: str) -> bytes:
    """A RunExperts of `tokens` tokens refused for `how`: another checkpoint's fingerprint (refused before any
    compute) or a NaN in the hidden states."""
    data = _run_experts_bytes(tokens, nan=how == "nan")
    if how == "fingerprint":
        data += zerocopy.RunExpertsRequest(model_fingerprint="f" * 16).SerializeToString()  # a field appended
    return data


def _refused_rss(service, method: str, payload: bytes, code: grpc.StatusCode) -> tuple[int, int]:
    """RSS (MiB) of `service` before and after 50 refused requests of `payload`, each answered `code`."""
    channel, raw = _raw(service.address, method)

    def send():
        with pytest.raises(grpc.RpcError) as err:
            raw(payload, timeout=60)
        assert err.value.code() == code, err.value.details()

    with channel:
        before, after = _rss_after(service, 50, send)
    print(f"\n{method}: RSS {before:.0f} -> {after:.0f} MiB after 50 refused requests of {len(payload)} bytes")
    return before, after


LIMIT = message_limit(H, TOP_K, 65536)  # the default --max-tokens: the largest request a server lets in


@pytest.mark.timeout(300)
def test_refused_maximum_size_requests_leave_memory_where_it_was(tiny_checkpoint, tmp_path, processes):
    """50 unauthenticated Forwards of the largest size the limit lets in leave the gateway's resident memory
    within 10% of where it started."""
    server = launch("expert-server", tmp_path / "e.log", checkpoint=tiny_checkpoint, experts="all")
    gateway = launch("gateway", tmp_path / "g.log", checkpoint=tiny_checkpoint, servers=[server.address],
                     auth_token="s3cret")
    processes += [server, gateway]
    gateway.wait_ready()
    payload = _forward_bytes((LIMIT - SLACK_BYTES) // (H * 4))
    assert 0.9 * LIMIT < len(payload) <= LIMIT
    before, after = _refused_rss(gateway, "/moe.v1.GatewayService/Forward", payload, grpc.StatusCode.UNAUTHENTICATED)
    assert after <= before * 1.10


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["fingerprint", "nan"])
def test_refused_maximum_size_run_experts_leave_memory_where_it_was(tiny_checkpoint, tmp_path, processes, how):
    server = launch("expert-server", tmp_path / "e.log", checkpoint=tiny_checkpoint, experts="all")
    processes.append(server)
    server.wait_ready()
    payload = _run_experts_refused((LIMIT - SLACK_BYTES) // (H * 4 + TOP_K * 12 + 4) - 16, how)
    assert 0.9 * LIMIT < len(payload) <= LIMIT
    code = grpc.StatusCode.INVALID_ARGUMENT if how == "nan" else grpc.StatusCode.FAILED_PRECONDITION
    before, after = _refused_rss(server, "/moe.v1.ExpertService/RunExperts", payload, code)
    assert after <= before * 1.10


def _count(metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_reply_over_the_limit_is_refused_before_compute_and_counted_as_an_error(cluster, tiny_checkpoint):
    """bf16 in, float32 out: the reply is twice the request. Over the limit it is refused before any expert
    runs (nothing computed, nothing sent) and counted RESOURCE_EXHAUSTED, not OK."""
    limit = 64 * 1024
    server = cluster.expert_server(tiny_checkpoint, experts="all", serving=ServingOptions(max_message_bytes=limit))
    gateway = cluster.gateway(tiny_checkpoint, [server], serving=ServingOptions(max_message_bytes=limit))
    rng = np.random.default_rng()
    tokens = 300  # 300 x 64 bf16 = 38 KB in, 77 KB out
    hidden = rng.standard_normal((tokens, H), dtype=np.float32)
    ids = rng.integers(0, 8, (tokens, TOP_K)).astype(np.int32)
    weights = rng.random((tokens, TOP_K), dtype=np.float32)
    request = zerocopy.RunExpertsRequest(layer=0, hidden=wire.encode_view(hidden, "bfloat16"),
                                         expert_ids=wire.encode_view(ids), weights=wire.encode_view(weights),
                                         output_dtype=wire.FLOAT32)
    metrics = cluster.expert_servicers[server].metrics
    with pytest.raises(grpc.RpcError) as err:
        run_experts(server, request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over this server's message limit of {limit} bytes" in err.value.details(), err.value.details()
    # (the count lands as the status goes out: waited for)
    wait_for(lambda: _count(metrics, "moe_requests_total", rpc="RunExperts", code="RESOURCE_EXHAUSTED") == 1,
             "RunExperts counted RESOURCE_EXHAUSTED", 10)
    assert _count(metrics, "moe_requests_total", rpc="RunExperts", code="OK") == 0
    assert _count(metrics, "moe_expert_compute_seconds_count", layer="0") == 0  # never computed

    gateway_metrics = cluster.servicers[gateway].metrics
    with GatewayClient(gateway) as client, pytest.raises(grpc.RpcError) as err:
        client.forward_raw(hidden, "bfloat16", output_dtype="float32")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Forward: the reply would be" in err.value.details(), err.value.details()
    wait_for(lambda: _count(gateway_metrics, "moe_requests_total", rpc="Forward", code="RESOURCE_EXHAUSTED") == 1,
             "Forward counted RESOURCE_EXHAUSTED", 10)
    assert _count(gateway_metrics, "moe_requests_total", rpc="Forward", code="OK") == 0
    assert _count(metrics, "moe_expert_compute_seconds_count", layer="0") == 0
    # Within the limit both answer, correctly.
    small = hidden[:20]
    with GatewayClient(gateway) as client:
        assert np.abs(client.forward(small) - reference_forward(tiny_checkpoint, small)).max() <= 1e-5
