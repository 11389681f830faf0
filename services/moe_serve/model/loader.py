"""Build models from checkpoints: the gateway's dense part, and the in-process reference."""

from __future__ import annotations

import torch

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.experts import ExpertWeights, LocalExperts
from moe_serve.core.simple_model import SimpleMoEModel
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.tensor_shapes import dense_tensor_shapes, expert_tensor_shapes

DenseModel = SimpleMoEModel | CausalLM


def load_dense_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> DenseModel:
    """Everything but the routed experts, as the gateway runs it; a missing or misshapen tensor is named."""
    spec = checkpoint.spec
    tensors = {name: checkpoint.load(name, shape) for name, shape in dense_tensor_shapes(spec).items()}
    if spec.has_attention:
        return CausalLM.from_tensors(spec, tensors, dtype, device)
    return SimpleMoEModel.from_tensors(spec, tensors, dtype, device)


def load_all_experts(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> LocalExperts:
    """Every routed expert on the CPU, computed one expert at a time: the reference for expert servers."""
    spec = checkpoint.spec
    experts = {}
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            tensors = (checkpoint.load(name, shape) for name, shape in expert_tensor_shapes(spec, layer, e).items())
            experts[layer, e] = ExpertWeights(*tensors).to(dtype=dtype)
    return LocalExperts(experts)


def load_reference(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                   expert_dtype: torch.dtype | None = None) -> tuple[DenseModel, LocalExperts]:
    """The whole model in this process, every expert on the CPU: what distributed runs must equal."""
    return load_dense_model(checkpoint, dtype), load_all_experts(checkpoint, expert_dtype or dtype)
