"""Experts loaded and dropped while serving, through the authenticated AdminService: gateways follow at once,
no request fails, every answer equals the reference; bad admin calls are refused and change nothing.
Real servers on loopback, in this process."""

import grpc
import pytest

from moe_client.admin import AdminClient
from moe_client.security import TLSFiles
from moe_serve.rpc.options import ServingOptions
from tests.support.certs import CA
from tests.support.load import Load
from tests.support.waiting import wait_for

TOKEN = "admin-secret"


def pool_of(cluster, gateway: str):
    return cluster.servicers[gateway].engine.experts.inner.pool


def owners(cluster, gateway: str, layer: int, expert: int) -> list[str]:
    return sorted(r.address for r in pool_of(cluster, gateway).owners.get(layer, {}).get(expert, ()))


def tokens_on(cluster, server: str, layer: int, expert: int) -> int:
    return cluster.expert_servicers[server].metrics.expert_tokens.value(layer, expert)


def test_load_takes_traffic_and_drop_routes_away_first(cluster, tiny_checkpoint):
    a = cluster.expert_server(tiny_checkpoint, experts="0-3", admin_token=TOKEN)
    b = cluster.expert_server(tiny_checkpoint, experts="4-7", admin_token=TOKEN)
    gateway = cluster.gateway(tiny_checkpoint, [a, b])
    load = Load(gateway, tiny_checkpoint, clients=2).start()
    try:
        load.wait_ok(10)
        with AdminClient(a, token=TOKEN) as admin_a, AdminClient(b, token=TOKEN) as admin_b:
            before = admin_a.info().placement_version
            reply = admin_a.load({0: [4, 5], 1: [4]})
            assert reply.placement_version == before + 1
            assert admin_a.owned() == {0: (0, 1, 2, 3, 4, 5), 1: (0, 1, 2, 3, 4)}
            wait_for(lambda: owners(cluster, gateway, 0, 4) == sorted([a, b]), "the gateway sees the new replica")
            wait_for(lambda: tokens_on(cluster, a, 0, 4) > 0, "the new replica takes traffic")

            dropped = admin_b.drop({0: [4, 5], 1: [4]})
            assert admin_b.owned() == {0: (6, 7), 1: (5, 6, 7)}
            assert dropped.placement_version == reply.placement_version + 1  # one for stop-listing, one for gone
            assert owners(cluster, gateway, 0, 4) == [a] and owners(cluster, gateway, 1, 4) == [a]
            served = tokens_on(cluster, b, 0, 4)
            load.wait_ok(20)
            assert tokens_on(cluster, b, 0, 4) == served  # nothing came for it after the drop
    finally:
        load.stop()
    assert load.failed == 0, load.first_errors


def test_admin_is_never_open_by_default(cluster, tiny_checkpoint, tmp_path):
    plain = cluster.expert_server(tiny_checkpoint, experts="0-7")
    with AdminClient(plain, timeout=10) as admin, pytest.raises(grpc.RpcError) as refused:
        admin.load({0: [1]})
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--admin-token-file" in refused.value.details()

    guarded = cluster.expert_server(tiny_checkpoint, experts="0-3", admin_token=TOKEN)
    for token in (None, "wrong"):
        with AdminClient(guarded, timeout=10, token=token) as admin, pytest.raises(grpc.RpcError) as refused:
            admin.expert_load()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    ca = CA(tmp_path, "test-ca")
    server, client = ca.issue("expert"), ca.issue("operator")
    mtls = cluster.expert_server(tiny_checkpoint, experts="0-3", serving=ServingOptions(
        tls=TLSFiles(ca.pem, server.cert, server.key), require_client_cert=True))
    with AdminClient(mtls, timeout=20, tls=TLSFiles(ca.pem, client.cert, client.key)) as admin:
        admin.load({1: [7]})
        assert admin.owned() == {0: (0, 1, 2, 3), 1: (0, 1, 2, 3, 7)}


def test_bad_admin_calls_are_refused_and_change_nothing(cluster, tiny_checkpoint):
    expert_bytes = 3 * 64 * 96 * 4  # TINY: hidden 64, width 96, float32
    server = cluster.expert_server(tiny_checkpoint, experts="0-3", admin_token=TOKEN,
                                   expert_capacity=f"cpu={9 * expert_bytes}B")  # room for one more
    gateway = cluster.gateway(tiny_checkpoint, [server, cluster.expert_server(tiny_checkpoint, experts="4-7")])
    load = Load(gateway, tiny_checkpoint, clients=2).start()
    try:
        with AdminClient(server, timeout=20, token=TOKEN) as admin:
            info = admin.info()
            bad = {
                "load expert 9": (lambda: admin.load({0: [9]}), grpc.StatusCode.INVALID_ARGUMENT,
                                  "layer 0: experts 9 are not in the checkpoint"),
                "load layer 5": (lambda: admin.load({5: [0]}), grpc.StatusCode.INVALID_ARGUMENT,
                                 "layer 5 is not a MoE layer"),
                "load one held": (lambda: admin.load({1: [2, 5]}), grpc.StatusCode.FAILED_PRECONDITION,
                                  "already held here: 1:2"),
                "no room": (lambda: admin.load({0: [4, 5]}), grpc.StatusCode.RESOURCE_EXHAUSTED, "no room on cpu"),
                "unknown device": (lambda: admin.load({0: [4]}, device="cuda:3"), grpc.StatusCode.INVALID_ARGUMENT,
                                   "device 'cuda:3' is not one of this server's devices"),
                "drop one not held": (lambda: admin.drop({0: [3, 4]}), grpc.StatusCode.NOT_FOUND,
                                      "not held here: 0:4"),
                "empty": (lambda: admin.drop({}), grpc.StatusCode.INVALID_ARGUMENT, "experts: empty"),
            }
            for what, (call, code, text) in bad.items():
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert (refused.value.code(), text in refused.value.details()) == (code, True), \
                    (what, refused.value.details())
                assert admin.info() == info, what
            admin.acquire_lock("someone-else", ttl_seconds=60)
            with pytest.raises(grpc.RpcError) as locked:
                admin.load({0: [4]}, lock_holder="me")
            assert locked.value.code() == grpc.StatusCode.ABORTED
            assert "lock held by 'someone-else'" in locked.value.details()
            admin.release_lock("someone-else")
            assert admin.info() == info
        load.wait_ok(10)
    finally:
        load.stop()
    assert load.failed == 0, load.first_errors
