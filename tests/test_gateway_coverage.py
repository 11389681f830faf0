"""The gateway and its expert servers' coverage, as real processes: health NOT_SERVING while some (layer,
expert) has no live replica (with the per-server up gauge), start-up lines naming the servers it waits for
(and starting without them once the others cover their experts), and TLS mistakes shown as what they are."""

import re
import signal
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_client import GatewayClient
from tests.support.certs import CA
from tests.support.launch import launch
from tests.support.ports import free_port
from tests.support.references import reference_forward
from tests.support.waiting import wait_for


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _health(address: str) -> str:
    with GatewayClient(address, timeout=5) as client:
        return client.health()


def _forward_ok(address: str, checkpoint) -> None:
    hidden = np.random.default_rng().standard_normal((10, 64), dtype=np.float32)
    with GatewayClient(address, timeout=30) as client:
        assert np.abs(client.forward(hidden) - reference_forward(checkpoint, hidden)).max() <= 1e-5


@pytest.mark.timeout(300)
def test_health_is_not_serving_while_experts_are_unserved(tiny_checkpoint, tmp_path, processes):
    a = launch("expert-server", tmp_path / "a.log", checkpoint=tiny_checkpoint, experts="0-3", name="a")
    b = launch("expert-server", tmp_path / "b.log", checkpoint=tiny_checkpoint, experts="4-7", name="b")
    metrics_port = free_port()
    gateway = launch("gateway", tmp_path / "gw.log", checkpoint=tiny_checkpoint, servers=[a.address, b.address],
                     metrics_port=metrics_port, keepalive=1)
    processes += [a, b, gateway]
    gateway.wait_ready()
    _forward_ok(gateway.address, tiny_checkpoint)
    up = lambda name: _scrape(metrics_port).get(("moe_expert_server_up", (("server", name),)))  # noqa: E731
    unserved = lambda: _scrape(metrics_port).get(("moe_unserved_experts", ()))  # noqa: E731
    assert (up("a"), up("b"), unserved()) == (1.0, 1.0, 0.0)

    b.signal(signal.SIGKILL)  # experts 4-7 have no replica left
    wait_for(lambda: _health(gateway.address) == "NOT_SERVING", "gateway NOT_SERVING with experts 4-7 unserved", 30)
    assert (up("a"), up("b"), unserved()) == (1.0, 0.0, 8.0)  # 4 experts x 2 MoE layers
    assert "health NOT_SERVING: no live replica for layer 0 experts 4-7; layer 1 experts 4-7" in gateway.output()

    b.start()  # back on the same address: coverage, and health, return by themselves
    wait_for(lambda: _health(gateway.address) == "SERVING", "gateway SERVING again", 120)
    assert (up("a"), up("b"), unserved()) == (1.0, 1.0, 0.0)
    _forward_ok(gateway.address, tiny_checkpoint)


@pytest.mark.timeout(300)
def test_start_up_names_the_servers_it_waits_for_then_starts(tiny_checkpoint, tmp_path, processes):
    a = launch("expert-server", tmp_path / "a.log", checkpoint=tiny_checkpoint, experts="0-3", name="a")
    b = launch("expert-server", tmp_path / "b.log", checkpoint=tiny_checkpoint, experts="4-7", name="b",
               start=False)
    processes += [a, b]
    a.wait_ready()
    gateway = launch("gateway", tmp_path / "gw.log", checkpoint=tiny_checkpoint, servers=[a.address, b.address],
                     connect_timeout=300)
    processes.append(gateway)
    waiting = re.compile(rf"waiting for expert server\(s\) {re.escape(b.address)} \(UNAVAILABLE: .*\); "
                         r"uncovered: layer 0: experts 4-7; layer 1: experts 4-7")
    wait_for(lambda: len(waiting.findall(gateway.output())) >= 2, "two lines naming the server waited for", 60,
             interval=0.5)
    assert gateway.alive
    b.start()
    gateway.wait_ready()
    _forward_ok(gateway.address, tiny_checkpoint)

    # A server whose experts others cover does not hold the start up: named, then joins when it answers.
    c = launch("expert-server", tmp_path / "c.log", checkpoint=tiny_checkpoint, experts="all", name="c", start=False)
    processes.append(c)
    started = time.monotonic()
    second = launch("gateway", tmp_path / "gw2.log", checkpoint=tiny_checkpoint,
                    servers=[a.address, b.address, c.address], connect_timeout=300)
    processes.append(second)
    second.wait_ready()
    assert time.monotonic() - started < 120  # not the connect timeout
    # c's first attempt may not have failed yet when the others cover everything: 'no answer yet' then.
    assert re.search(rf"starting without expert server\(s\) {re.escape(c.address)} \((UNAVAILABLE|no answer yet)",
                     second.output())
    c.start()
    with GatewayClient(second.address) as client:
        wait_for(lambda: "c" in {s.name for s in client.model_info().servers}, "c joins", 120)


def test_tls_mistakes_are_shown_not_timeouts(tiny_checkpoint, tmp_path, processes):
    """A missing client certificate and a certificate for another name: the gateway's error says so, where it
    said 'did not answer GetInfo within 8s (DEADLINE_EXCEEDED)'."""
    ca = CA(tmp_path, "ca")
    expert, other_name = ca.issue("expert"), ca.issue("elsewhere", hosts=("elsewhere.example",))
    strict = launch("expert-server", tmp_path / "s.log", checkpoint=tiny_checkpoint, experts="all",
                    tls_cert=expert.cert, tls_key=expert.key, tls_ca=ca.pem, require_client_cert=True)
    misnamed = launch("expert-server", tmp_path / "m.log", checkpoint=tiny_checkpoint, experts="all",
                      tls_cert=other_name.cert, tls_key=other_name.key)
    processes += [strict, misnamed]
    cases = {strict: "requires a client certificate signed by its --tls-ca, and this gateway sends none",
             misnamed: "Hostname Verification Check failed"}
    for server, expected in cases.items():
        gateway = launch("gateway", tmp_path / f"g{server.pid}.log", checkpoint=tiny_checkpoint,
                         servers=[server.address], expert_tls_ca=ca.pem, connect_timeout=8)
        processes.append(gateway)
        assert gateway.wait(120) == 2
        error = [line for line in gateway.output().splitlines() if line.startswith("moe-gateway: error:")]
        assert len(error) == 1 and "DEADLINE_EXCEEDED" not in error[0], gateway.output()
        assert expected in error[0], error[0]
