"""The load benchmark's cluster: a random causal MoE checkpoint, and expert servers and a gateway as
subprocesses on loopback (each started, waited for, and stopped)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_serve.model.config import spec_from_config
from moe_serve.model.tensor_shapes import dense_tensor_shapes, expert_tensor_shapes


@dataclass(frozen=True)
class ModelSize:
    """A qwen2_moe-style model: attention, routed experts on the servers, a gated shared expert here."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 8
    experts: int = 8
    top_k: int = 2
    expert_width: int = 512
    shared_width: int = 512
    vocab: int = 2048

    def config(self) -> dict:
        """config.json of the model."""
        return {
            "model_type": "qwen2_moe", "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "num_experts": self.experts, "num_experts_per_tok": self.top_k, "moe_intermediate_size": self.expert_width,
            "shared_expert_intermediate_size": self.shared_width, "intermediate_size": 4 * self.hidden,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "norm_topk_prob": False,
            "rms_norm_eps": 1e-6, "torch_dtype": "float32", "eos_token_id": None, "tie_word_embeddings": False,
        }


def write_checkpoint(path: Path, size: ModelSize, seed: int = 0) -> Path:
    """Random weights (scaled by fan-in, norms near 1) for every tensor of `size`, as config.json + safetensors."""
    config = size.config()
    spec = spec_from_config(config)
    shapes = dict(dense_tensor_shapes(spec))
    for layer in spec.moe_layers:
        for expert in range(spec.num_experts):
            shapes.update(expert_tensor_shapes(spec, layer, expert))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if "norm" in name:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            tensors[name] = 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


class Service:
    """One moe-serve process; its address is read from the line it prints when ready."""

    READY = re.compile(r"ready on (\S+?):(\d+)")

    def __init__(self, args: list[str], log: Path, threads: int | None = None, cpus: set[int] | None = None,
                 timeout: float = 120.0):
        env = dict(os.environ)
        if threads is not None:  # torch's intra-op threads of this process
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-u", *args], stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, env=env)
        if cpus:  # before it loads anything: its threads inherit the set
            os.sched_setaffinity(self.process.pid, cpus)
        deadline = time.monotonic() + timeout
        while True:
            match = self.READY.search(log.read_text())
            if match:
                self.address = f"127.0.0.1:{match.group(2)}"
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{args[:3]} did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def expert_server(checkpoint: Path, experts: str, log: Path, threads: int | None, cpus: set[int] | None = None,
                  merge: bool = True) -> Service:
    """`moe-expert-server` on a free loopback port."""
    return Service(["-m", "moe_serve.expert_server.main", "--checkpoint", str(checkpoint), "--experts", experts,
                    "--host", "127.0.0.1", "--port", "0", "--grace", "0", "--log-level", "WARNING",
                    "--merge-calls" if merge else "--no-merge-calls"], log, threads, cpus)


def gateway(checkpoint: Path, servers: list[str], flags: list[str], log: Path, threads: int | None,
            cpus: set[int] | None = None) -> Service:
    """`moe-gateway` over `servers` with extra `flags`, on a free loopback port."""
    return Service(["-m", "moe_serve.gateway.main", "--checkpoint", str(checkpoint), "--servers", ",".join(servers),
                    "--host", "127.0.0.1", "--port", "0", "--grace", "0", "--log-level", "WARNING",
                    "--max-new-tokens", "4096", *flags], log, threads, cpus)
