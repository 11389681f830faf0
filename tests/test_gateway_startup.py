"""The gateway refuses to serve a model its expert servers do not cover, or a different checkpoint."""

import json
import subprocess

import grpc
import pytest

from moe_client.pb import gateway_pb2, gateway_pb2_grpc
from moe_serve.gateway.dispatch import StartupError
from moe_serve.model.synthetic import write_checkpoint
from tests.support import BIN
from tests.support.checkpoints import TINY
from tests.support.ports import free_port


def test_refuses_when_an_expert_has_no_owner(cluster, tiny_checkpoint):
    servers = [cluster.expert_server(tiny_checkpoint, experts="0-2"),
               cluster.expert_server(tiny_checkpoint, experts=["0:3-7", "1:3-5"])]
    with pytest.raises(StartupError, match=r"no expert server owns layer 1: experts 6-7"):
        cluster.gateway(tiny_checkpoint, servers)


def test_refuses_a_server_on_another_checkpoint(cluster, tiny_checkpoint, tmp_path):
    other = write_checkpoint(tmp_path / "other", TINY.__class__(**{**TINY.__dict__, "seed": 99}))
    servers = [cluster.expert_server(tiny_checkpoint, experts="0-3"), cluster.expert_server(other, experts="4-7")]
    with pytest.raises(StartupError, match=r"serves checkpoint [0-9a-f]{16} .*the gateway's is [0-9a-f]{16}"):
        cluster.gateway(tiny_checkpoint, servers)


def test_placement_file_must_match_servers(cluster, tiny_checkpoint, tmp_path):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"servers": [
        {"name": "w1", "address": servers[0], "experts": "0-4"},
        {"name": "w2", "address": servers[1], "experts": "4-7"},
    ]}))
    with pytest.raises(StartupError, match=r"server w1 .* does not hold layer 0: \[4\]"):
        cluster.gateway(tiny_checkpoint, [], placement=str(placement))


def test_placement_file_server_silent_at_start_is_not_held_against_it(cluster, tiny_checkpoint, tmp_path):
    # The gateway starts once the servers that answered cover the model; one listed but not answering yet has no
    # known experts, and must not fail the placement check (docker-compose: a container a moment slower).
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    silent = f"127.0.0.1:{free_port()}"
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"servers": [
        {"name": "w1", "address": servers[0], "experts": "0-3"},
        {"name": "w2", "address": servers[1], "experts": "4-7"},
        {"name": "w3", "address": silent, "experts": "0-7"},
    ]}))
    gateway = cluster.gateway(tiny_checkpoint, [], placement=str(placement), connect_timeout=5.0)
    with grpc.insecure_channel(gateway) as channel:
        info = gateway_pb2_grpc.GatewayServiceStub(channel).GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=30)
    assert sorted(s.address for s in info.servers) == sorted(servers)


def test_unreachable_server_is_named(cluster, tiny_checkpoint):
    with pytest.raises(StartupError, match=r"not answering within 1s: 127.0.0.1:1 \(UNAVAILABLE: "):
        cluster.gateway(tiny_checkpoint, ["127.0.0.1:1"], connect_timeout=1.0)


@pytest.mark.parametrize("flag,value", [("--tcp-lanes", "0"), ("--tcp-min-piece-bytes", "0"),
                                                ("--tcp-pieces-per-lane", "0")])
def test_bad_lane_settings_are_one_line_naming_the_value(tiny_checkpoint, flag, value):
    done = subprocess.run([str(BIN / "moe-gateway"), "--checkpoint", str(tiny_checkpoint), "--servers", "127.0.0.1:1",
                           "--connect-timeout", "1", flag, value], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert f"moe-gateway: error: {flag} {value} must be at least 1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
