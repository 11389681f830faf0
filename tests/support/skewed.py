"""Checkpoints whose routers favour some experts, so routing is skewed as in real models (random routers
spread tokens evenly, and a balanced placement would have nothing to fix)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file

from moe_serve.model.checkpoint import Checkpoint


def skew_router(path: Path, scale: Mapping[int, float]) -> Path:
    """Multiply router rows of experts in `scale` by their factor, in every MoE layer of the (unsharded)
    checkpoint at `path`: a row of larger norm wins the top-k for more tokens."""
    spec = Checkpoint(path).spec
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{path}: skew_router takes one safetensors file, found {len(files)}")
    tensors = load_file(files[0])
    for layer in spec.moe_layers:
        name = spec.router_name(layer)
        weight = tensors[name].clone()
        for expert, factor in scale.items():
            weight[expert] *= factor
        tensors[name] = weight.contiguous()
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    return path
