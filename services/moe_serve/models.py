"""Build models from checkpoints: the gateway's dense part, and the in-process reference."""

from __future__ import annotations

import torch

from moe_serve.checkpoint import Checkpoint
from moe_serve.core.experts import LocalExperts
from moe_serve.core.simple_model import SimpleMoEModel
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.placement import resolve_ownership


def load_dense_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> SimpleMoEModel:
    """Everything but the routed experts, as the gateway runs it; shapes checked against the spec."""
    spec = checkpoint.spec
    h = spec.hidden_size
    shapes = {name: (h,) for name in SimpleMoEModel.tensor_names(spec)}
    shapes.update({spec.router_name(layer): (spec.num_experts, h) for layer in spec.moe_layers})
    tensors = {name: checkpoint.load(name, shape) for name, shape in shapes.items()}
    return SimpleMoEModel.from_tensors(spec, tensors, dtype)


def load_reference(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                   expert_dtype: torch.dtype | None = None) -> tuple[SimpleMoEModel, LocalExperts]:
    """The whole model in this process, every expert on the CPU: what distributed runs must equal."""
    bank = ExpertBank.load(checkpoint, resolve_ownership(checkpoint.spec, "all"), [torch.device("cpu")],
                           expert_dtype or dtype)
    experts = {(layer, e): w for layer, by_id in bank.experts.items() for e, w in by_id.items()}
    return load_dense_model(checkpoint, dtype), LocalExperts(experts)
