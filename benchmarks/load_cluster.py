"""The load benchmark's cluster: a random causal MoE checkpoint, and expert servers and a gateway as
subprocesses on loopback (tests.support's launcher: each started, waited for, and stopped)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_serve.model.config import spec_from_config
from moe_serve.model.tensor_shapes import dense_tensor_shapes, expert_tensor_shapes
from tests.support.launch import ServiceProcess, launch


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


def _service(program: str, log: Path, threads: int | None, cpus: set[int] | None, **options) -> ServiceProcess:
    """`program` on a free loopback port, SERVING; `threads`: torch's intra-op threads (OMP_NUM_THREADS)."""
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    return launch(program, log, env=env, cpus=cpus, grace=0, log_level="WARNING", **options).wait_ready(120)


def expert_server(checkpoint: Path, experts: str, log: Path, threads: int | None, cpus: set[int] | None = None,
                  merge: bool = True) -> ServiceProcess:
    """`moe-expert-server` on a free loopback port."""
    return _service("expert-server", log, threads, cpus, checkpoint=checkpoint, experts=experts, merge_calls=merge)


def gateway(checkpoint: Path, servers: list[str], flags: list[str], log: Path, threads: int | None,
            cpus: set[int] | None = None) -> ServiceProcess:
    """`moe-gateway` over `servers` with extra `flags`, on a free loopback port."""
    return _service("gateway", log, threads, cpus, checkpoint=checkpoint, servers=servers, max_new_tokens=4096,
                    args=flags)
