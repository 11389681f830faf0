"""The real entry points as subprocesses: servers, gateway and client CLI, then a clean SIGTERM stop."""

import subprocess

import numpy as np

from tests.support import BIN
from tests.support.launch import launch
from tests.support.references import reference_forward


def test_cluster_from_the_command_line(processes, tiny_checkpoint, tmp_path):
    for name, experts in (("worker1", "0-3"), ("worker2", "4-7")):
        processes.append(launch("expert-server", tmp_path / f"{name}.log", console_script=True,
                                checkpoint=tiny_checkpoint, experts=experts, name=name))
    processes.append(launch("gateway", tmp_path / "gateway.log", console_script=True, checkpoint=tiny_checkpoint,
                            servers=[s.address for s in processes]))
    gateway = processes[2].wait_ready(60).address

    hidden = np.random.default_rng().standard_normal((2, 10, 64), dtype=np.float32)
    np.save(tmp_path / "in.npy", hidden)
    run = subprocess.run([str(BIN / "moe-client"), "--address", gateway, "forward", "--input", str(tmp_path / "in.npy"),
                          "--output", str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Input shape: [2, 10, 64]" in run.stdout and "Output shape: [2, 10, 64]" in run.stdout
    assert "Distributed inference complete!" in run.stdout
    assert np.abs(np.load(tmp_path / "out.npy") - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5

    gateway_log = processes[2].stop_clean()
    assert "Expert-to-server mapping, layer 0: {0: 'worker1'" in gateway_log and "Stopped." in gateway_log
    worker_log = processes[0].stop_clean()
    assert "Expert 0 → cpu" in worker_log and "ready on 127.0.0.1" in worker_log
    processes[1].stop_clean()


def test_gateway_cli_refuses_uncovered_model(processes, tiny_checkpoint, tmp_path):
    server = launch("expert-server", tmp_path / "server.log", console_script=True, checkpoint=tiny_checkpoint,
                    experts="0-6")
    processes.append(server)
    gateway = subprocess.run([str(BIN / "moe-gateway"), "--checkpoint", str(tiny_checkpoint), "--servers",
                              server.address, "--port", "0", "--connect-timeout", "60"],
                             capture_output=True, text=True, timeout=90)
    assert gateway.returncode == 2
    assert "no expert server owns layer 0: experts 7; layer 1: experts 7" in gateway.stderr


def test_expert_server_cli_names_bad_experts(tiny_checkpoint):
    run = subprocess.run([str(BIN / "moe-expert-server"), "--checkpoint", str(tiny_checkpoint), "--experts", "5-9",
                          "--port", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "expert ids 8-9 out of range" in run.stderr
