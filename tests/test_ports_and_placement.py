"""Where services listen, as real processes: a busy port is a one-line error before anything loads (no
SO_REUSEPORT sharing), and `--placement FILE --name N` listens on its entry's address."""

import json
import socket
import sys

import numpy as np
import pytest

from moe_client import GatewayClient
from tests.support.launch import PROGRAMS, ServiceProcess, launch
from tests.support.ports import free_port
from tests.support.references import reference_forward


def _one_line_error(process, program: str, port: int) -> None:
    code = process.wait(120)
    out = process.output()
    assert code == 2, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert errors == [f"{program}: error: port {port} on 127.0.0.1 is already in use by another process; stop it "
                      "or choose another --port"], out
    assert "Traceback" not in out, out


def test_a_second_expert_server_on_a_held_port_fails_at_once(tiny_checkpoint, tmp_path, processes):
    first = launch("expert-server", tmp_path / "a.log", checkpoint=tiny_checkpoint, experts="all", name="a")
    processes.append(first)
    first.wait_ready()
    port = int(first.address.rsplit(":", 1)[1])
    second = launch("expert-server", tmp_path / "b.log", checkpoint=tiny_checkpoint, experts="all", name="b",
                    port=port)
    processes.append(second)
    _one_line_error(second, "moe-expert-server", port)
    assert "Expert 0" not in second.output()  # nothing was loaded
    assert first.alive


@pytest.mark.parametrize("program", ["expert-server", "gateway"])
def test_a_port_held_by_another_program_is_one_line_before_loading(tiny_checkpoint, tmp_path, processes, program):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        options = {"experts": "all"} if program == "expert-server" else {"servers": ["127.0.0.1:1"]}
        service = launch(program, tmp_path / "s.log", checkpoint=tiny_checkpoint, port=port, **options)
        processes.append(service)
        _one_line_error(service, PROGRAMS[program][0], port)
    assert "Connecting to" not in service.output() and "Expert 0" not in service.output()


def test_placement_name_listens_on_its_entry(tiny_checkpoint, tmp_path, processes):
    """Two servers on one host from one placement file, started as README says (--placement and --name, no
    --port): each listens on its own entry's address, and a gateway from the same file serves."""
    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"servers": [
        {"name": "worker1", "address": f"127.0.0.1:{ports[0]}", "experts": "0-3"},
        {"name": "worker2", "address": f"127.0.0.1:{ports[1]}", "experts": {"0": "4-7", "1": "4-7"}}]}))
    workers = []
    for name, port in zip(("worker1", "worker2"), ports, strict=True):
        argv = [sys.executable, "-m", PROGRAMS["expert-server"][1], "--checkpoint", str(tiny_checkpoint),
                "--placement", str(placement), "--name", name]
        workers.append(ServiceProcess(argv, tmp_path / f"{name}.log", label=name, address=f"127.0.0.1:{port}").start())
    processes.extend(workers)
    for worker in workers:
        worker.wait_ready()
        assert f"ready on 127.0.0.1:{worker.address.rsplit(':', 1)[1]}" in worker.output()
    gateway = launch("gateway", tmp_path / "gw.log", checkpoint=tiny_checkpoint, placement=placement)
    processes.append(gateway)
    gateway.wait_ready()
    hidden = np.random.default_rng().standard_normal((12, 64), dtype=np.float32)
    with GatewayClient(gateway.address) as client:
        assert np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
        assert sorted(s.name for s in client.model_info().servers) == ["worker1", "worker2"]
