"""What the services print, as processes: counts that agree with the progress bar, per-layer placement, servers
by name, and stops without tracebacks or lines after "Stopped."."""

import re
import signal

import numpy as np

from moe_client import GatewayClient
from tests.support.launch import launch
from tests.support.references import reference_forward


def _after(log: str, marker: str) -> list[str]:
    """The lines after the last `marker` line."""
    lines = log.splitlines()
    return lines[max(i for i, line in enumerate(lines) if marker in line) + 1:]


def test_start_up_text_and_quiet_stops(tiny_checkpoint, tmp_path, processes):
    a = launch("expert-server", tmp_path / "a.log", checkpoint=tiny_checkpoint, experts="0-3", name="worker1")
    b = launch("expert-server", tmp_path / "b.log", checkpoint=tiny_checkpoint, name="worker2",
               args=["--experts", "0:4-7", "--experts", "1:3-7"])
    gateway = launch("gateway", tmp_path / "gw.log", checkpoint=tiny_checkpoint, servers=[a.address, b.address])
    processes += [a, b, gateway]
    gateway.wait_ready()
    hidden = np.random.default_rng().standard_normal((8, 64), dtype=np.float32)
    with GatewayClient(gateway.address) as client:
        assert np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5

    # The count matches the progress bar's (layer, expert) pairs; placement lines say their layer when layers
    # differ, and are the seed's "Expert 0 → cpu" when every layer is alike.
    a_log = a.output()
    assert "Distributing 8 experts (4 in each of 2 MoE layers)" in a_log
    assert re.search(r"Loading experts \[#+\] 8/8 ", a_log), a_log
    assert "  Expert 0 → cpu  (every MoE layer)" in a_log
    b_log = b.output()
    assert "Distributing 9 experts over 2 MoE layer(s)" in b_log, b_log
    assert re.search(r"Loading experts \[#+\] 9/9 ", b_log), b_log
    assert "  Layer 0: Expert 4 → cpu, Expert 5 → cpu, Expert 6 → cpu, Expert 7 → cpu" in b_log, b_log
    assert "  Layer 1: Expert 3 → cpu, Expert 4 → cpu" in b_log, b_log
    assert f"worker1 ({a.address}), worker2 ({b.address})" in gateway.output()  # the summary names them

    # An expert server stopped while the gateway watches it: no CancelledError traceback from Health/Watch.
    a.signal(signal.SIGTERM)
    assert a.wait(60) == 0
    stopped = _after(a.output(), "Shutting down")
    assert stopped == ["Stopped."], stopped
    assert gateway.alive
    b.signal(signal.SIGTERM)
    assert b.wait(60) == 0
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(60) == 0
    assert _after(gateway.output(), "Stopped.") == [], gateway.output()[-2000:]
