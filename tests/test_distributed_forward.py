"""Distributed Forward through real servers on loopback equals the in-process reference."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from moe_client import GatewayClient, cli, wire
from moe_serve.model.synthetic import write_checkpoint
from tests.support.checkpoints import TINY
from tests.support.references import reference_forward

ASSIGNMENTS = {
    "one server": ["all"],
    "two even": ["0-3", "4-7"],
    "three uneven": ["0", "1-5", "6-7"],
    "interleaved": ["0,2,4,6", "1,3,5,7"],
    "per layer": [["0:0-5", "1:0-1"], ["0:6-7", "1:2-7"]],
}


@pytest.mark.parametrize("name", list(ASSIGNMENTS))
def test_forward_equals_reference(cluster, tiny_checkpoint, name):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ASSIGNMENTS[name]]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    hidden = np.random.default_rng().standard_normal((2, 10, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert got.shape == hidden.shape
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5


@pytest.mark.parametrize("tokens", [1, 2, 17, 256, 2048])
def test_batch_sizes(cluster, tiny_checkpoint, tokens):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-2", "3-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    hidden = np.random.default_rng().standard_normal((tokens, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5


def test_server_with_two_devices(cluster, tiny_checkpoint):
    # CI has no GPU: two CPU device entries exercise the round-robin path; the GPU run uses cuda:0,cpu.
    devices = "cuda:0,cpu" if torch.cuda.is_available() else "cpu,cpu"
    servers = [cluster.expert_server(tiny_checkpoint, experts="0-4", devices=devices),
               cluster.expert_server(tiny_checkpoint, experts="5-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    hidden = np.random.default_rng().standard_normal((3, 5, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
        info = client.model_info()
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    assert list(info.servers[0].devices) == list(dict.fromkeys(devices.split(",")))


def test_bf16_wire_and_compute_stay_close(cluster, tmp_path):
    # One MoE layer, so routing (fp32, in the gateway, on identical inputs) cannot flip between the two
    # runs; a near-tie flipped by bf16 rounding in a later layer would be a different but valid answer.
    checkpoint = write_checkpoint(tmp_path / "one-layer", replace(TINY, num_hidden_layers=1))
    servers = [cluster.expert_server(checkpoint, experts=e, dtype="bfloat16") for e in ("0-3", "4-7")]
    gateway = cluster.gateway(checkpoint, servers, wire_dtype="bfloat16")
    hidden = np.random.default_rng().standard_normal((64, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    want = reference_forward(checkpoint, hidden)
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)  # bf16 operands: 1e-3 to 1e-2
    assert relative < 1e-2 and np.abs(got - want).max() < 5e-2, (relative, np.abs(got - want).max())


def test_model_info_lists_servers(cluster, tiny_checkpoint, capsys):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e, name=n) for e, n in (("0-3", "a"), ("4-7", "b"))]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    with GatewayClient(gateway) as client:
        info = client.model_info()
        assert client.health() == "SERVING"
    assert info.model_type == "simple_moe" and info.hidden_size == 64 and info.num_experts == 8
    assert info.dense_dtype == wire.FLOAT32
    assert [(s.name, s.address) for s in info.servers] == [("a", servers[0]), ("b", servers[1])]
    assert [(o.layer, list(o.experts)) for o in info.servers[1].owned] == [(0, [4, 5, 6, 7]), (1, [4, 5, 6, 7])]
    # `moe-client info` prints the structured ownership as ranges.
    assert cli.main(["--address", gateway, "info"]) == 0
    out = capsys.readouterr().out
    assert "dense dtype float32" in out
    assert f"  b at {servers[1]}  devices cpu (float32)  experts 0:4-7; 1:4-7" in out
