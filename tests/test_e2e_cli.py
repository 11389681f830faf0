"""The real entry points as subprocesses: servers, gateway and client CLI, then a clean SIGTERM stop."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_distributed_forward import reference_forward

from moe_client import GatewayClient

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def test_cluster_from_the_command_line(processes, tiny_checkpoint, tmp_path):
    ports = [free_port() for _ in range(3)]
    for name, experts, port in (("worker1", "0-3", ports[1]), ("worker2", "4-7", ports[2])):
        processes.append(spawn("moe-expert-server", "--checkpoint", str(tiny_checkpoint), "--experts", experts,
                               "--name", name, "--host", "127.0.0.1", "--port", str(port)))
    servers = f"127.0.0.1:{ports[1]},127.0.0.1:{ports[2]}"
    processes.append(spawn("moe-gateway", "--checkpoint", str(tiny_checkpoint), "--servers", servers,
                           "--host", "127.0.0.1", "--port", str(ports[0])))
    gateway = f"127.0.0.1:{ports[0]}"
    with GatewayClient(gateway) as client:
        client.wait_until_serving(60)

    hidden = np.random.default_rng().standard_normal((2, 10, 64), dtype=np.float32)
    np.save(tmp_path / "in.npy", hidden)
    run = subprocess.run([str(BIN / "moe-client"), "--address", gateway, "forward", "--input", str(tmp_path / "in.npy"),
                          "--output", str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Input shape: [2, 10, 64]" in run.stdout and "Output shape: [2, 10, 64]" in run.stdout
    assert "Distributed inference complete!" in run.stdout
    assert np.abs(np.load(tmp_path / "out.npy") - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5

    gateway_log = stop(processes[2])
    assert "Expert-to-server mapping, layer 0: {0: 'worker1'" in gateway_log and "Stopped." in gateway_log
    worker_log = stop(processes[0])
    assert "Expert 0 → cpu" in worker_log and "ready on 127.0.0.1" in worker_log
    stop(processes[1])


def test_gateway_cli_refuses_uncovered_model(processes, tiny_checkpoint):
    port = free_port()
    processes.append(spawn("moe-expert-server", "--checkpoint", str(tiny_checkpoint), "--experts", "0-6",
                           "--host", "127.0.0.1", "--port", str(port)))
    gateway = subprocess.run([str(BIN / "moe-gateway"), "--checkpoint", str(tiny_checkpoint), "--servers",
                              f"127.0.0.1:{port}", "--port", "0", "--connect-timeout", "60"],
                             capture_output=True, text=True, timeout=90)
    assert gateway.returncode == 2
    assert "no expert server owns layer 0: experts 7; layer 1: experts 7" in gateway.stderr


def test_expert_server_cli_names_bad_experts(tiny_checkpoint):
    run = subprocess.run([str(BIN / "moe-expert-server"), "--checkpoint", str(tiny_checkpoint), "--experts", "5-9",
                          "--port", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "expert ids 8-9 out of range" in run.stderr
