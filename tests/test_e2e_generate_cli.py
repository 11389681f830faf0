"""The README's path for a real checkpoint, as subprocesses: inspect -> placement file -> expert servers ->
gateway -> moe-client generate, with tokens printed as they arrive."""

import subprocess

import torch

from moe_client import GatewayClient
from tests.support import BIN
from tests.support.checkpoints import build_tokenizer, write_text_checkpoint
from tests.support.launch import launch


def test_inspect_placement_servers_gateway_generate(processes, tmp_path):
    path = write_text_checkpoint(tmp_path / "model", int(torch.randint(0, 2**31, ())))
    placement = tmp_path / "placement.json"
    servers = [launch("expert-server", tmp_path / f"{name}.log", console_script=True, start=False, checkpoint=path,
                      placement=placement, name=name) for name in ("worker1", "worker2")]
    addresses = ",".join(s.address for s in servers)
    run = subprocess.run([str(BIN / "moe-serve"), "inspect", str(path), "--addresses", addresses,
                          "--write-placement", str(placement)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "worker1: 8 experts" in run.stdout and "worker2: 8 experts" in run.stdout  # 2 MoE layers x 8 / 2
    processes.extend(s.start() for s in servers)
    processes.append(launch("gateway", tmp_path / "gateway.log", console_script=True, checkpoint=path,
                            placement=placement))
    gateway = processes[2].wait_ready(90).address
    with GatewayClient(gateway) as client:
        want = list(client.generate("The gateway routes", max_new_tokens=12, ignore_eos=True))

    # Bytes, decoded here: random weights may generate a "\r", which text mode would read as "\n".
    run = subprocess.run([str(BIN / "moe-client"), "--address", gateway, "generate", "The gateway routes",
                          "--max-new-tokens", "12", "--ignore-eos"], capture_output=True, timeout=60, check=False)
    stdout, stderr = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, stderr
    assert stdout == "".join(t.text for t in want) + "\n"
    prompt_len = len(build_tokenizer().encode("The gateway routes").ids)
    assert f"[finish: length; prompt {prompt_len} tokens, generated 12 in" in stderr

    gateway_log = processes[2].stop_clean()
    assert "Causal LM: 3 decoder layers (dense MLP: [0])" in gateway_log and "tokenizer.json yes" in gateway_log
    processes[0].stop_clean()
    processes[1].stop_clean()
