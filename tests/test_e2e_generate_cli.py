"""The README's path for a real checkpoint, as subprocesses: inspect -> placement file -> expert servers ->
gateway -> moe-client generate, with tokens printed as they arrive."""

import subprocess

import torch
from test_e2e_cli import BIN, free_port, spawn, stop
from text_checkpoint import build_tokenizer, write_text_checkpoint

from moe_client import GatewayClient


def test_inspect_placement_servers_gateway_generate(processes, tmp_path):
    path = write_text_checkpoint(tmp_path / "model", int(torch.randint(0, 2**31, ())))
    ports = [free_port() for _ in range(3)]
    placement = tmp_path / "placement.json"
    addresses = f"127.0.0.1:{ports[1]},127.0.0.1:{ports[2]}"
    run = subprocess.run([str(BIN / "moe-serve"), "inspect", str(path), "--addresses", addresses,
                          "--write-placement", str(placement)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "worker1: 8 experts" in run.stdout and "worker2: 8 experts" in run.stdout  # 2 MoE layers x 8 / 2
    for name, port in (("worker1", ports[1]), ("worker2", ports[2])):
        processes.append(spawn("moe-expert-server", "--checkpoint", str(path), "--placement", str(placement),
                               "--name", name, "--host", "127.0.0.1", "--port", str(port)))
    processes.append(spawn("moe-gateway", "--checkpoint", str(path), "--placement", str(placement),
                           "--host", "127.0.0.1", "--port", str(ports[0])))
    gateway = f"127.0.0.1:{ports[0]}"
    with GatewayClient(gateway) as client:
        client.wait_until_serving(90)
        want = list(client.generate("The gateway routes", max_new_tokens=12, ignore_eos=True))

    # Bytes, decoded here: random weights may generate a "\r", which text mode would read as "\n".
    run = subprocess.run([str(BIN / "moe-client"), "--address", gateway, "generate", "The gateway routes",
                          "--max-new-tokens", "12", "--ignore-eos"], capture_output=True, timeout=60, check=False)
    stdout, stderr = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, stderr
    assert stdout == "".join(t.text for t in want) + "\n"
    prompt_len = len(build_tokenizer().encode("The gateway routes").ids)
    assert f"[finish: length; prompt {prompt_len} tokens, generated 12 in" in stderr

    gateway_log = stop(processes[2])
    assert "Causal LM: 3 decoder layers (dense MLP: [0])" in gateway_log and "tokenizer.json yes" in gateway_log
    stop(processes[0])
    stop(processes[1])
