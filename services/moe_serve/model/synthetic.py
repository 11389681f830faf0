"""The embedded default model: a deterministic random simple_moe checkpoint written to disk.

Same layout as real checkpoints (config.json + model.safetensors, per-expert tensor names), so one
loader serves both and nothing needs downloading.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_serve.model.config import spec_from_config


@dataclass(frozen=True)
class SyntheticConfig:
    """Dimensions of a generated simple_moe model; the defaults are the embedded demo model."""

    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 2
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    seed: int = 0

    def to_json(self) -> dict:
        """config.json contents."""
        return {"model_type": "simple_moe", "torch_dtype": "float32", **asdict(self)}


def generate_tensors(cfg: SyntheticConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the model, drawn from a generator seeded by cfg.seed."""
    spec = spec_from_config(cfg.to_json())
    gen = torch.Generator().manual_seed(cfg.seed)
    h, i = cfg.hidden_size, cfg.intermediate_size

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    tensors: dict[str, torch.Tensor] = {}
    for layer in spec.moe_layers:
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = 1.0 + randn(h, scale=0.1)
        tensors[spec.router_name(layer)] = randn(cfg.num_experts, h, scale=1.0 / h**0.5)
        for expert in range(cfg.num_experts):
            gate, up, down = spec.expert_names(layer, expert)
            tensors[gate] = randn(i, h, scale=1.0 / h**0.5)
            tensors[up] = randn(i, h, scale=1.0 / h**0.5)
            tensors[down] = randn(h, i, scale=1.0 / i**0.5)
    tensors["model.norm.weight"] = 1.0 + randn(h, scale=0.1)
    return tensors


def write_checkpoint(path: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write config.json + model.safetensors for `cfg` into `path` (created if missing)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(generate_tensors(cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return out
