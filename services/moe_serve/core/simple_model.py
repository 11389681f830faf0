"""The embedded default model: the seed's SimpleMoEModel grown up.

A stack of pre-norm MoE blocks, h = h + moe(rms_norm(h)), then a final RMSNorm. The routed
experts run wherever the ExpertBackend puts them; everything else runs here.
Legend: T = tokens, H = hidden size, E = experts, K = top-k.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moe_serve.core.experts import ExpertBackend
from moe_serve.core.norms import rms_norm
from moe_serve.core.routing import route, router_logits
from moe_serve.core.spec import ModelSpec


class SimpleMoEModel:
    """Hidden states [T, H] through every MoE layer of a simple_moe checkpoint."""

    def __init__(
        self,
        spec: ModelSpec,
        norms: Mapping[int, torch.Tensor],  # layer -> [H]
        routers: Mapping[int, torch.Tensor],  # layer -> [E, H]
        final_norm: torch.Tensor,  # [H]
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.norms = {layer: w.to(device, dtype) for layer, w in norms.items()}
        self.routers = {layer: w.to(device, dtype) for layer, w in routers.items()}
        self.final_norm = final_norm.to(device, dtype)

    @staticmethod
    def tensor_names(spec: ModelSpec) -> list[str]:
        """Every non-expert tensor the model reads."""
        names = [f"model.layers.{layer}.input_layernorm.weight" for layer in spec.moe_layers]
        return names + [spec.router_name(layer) for layer in spec.moe_layers] + ["model.norm.weight"]

    @classmethod
    def from_tensors(cls, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> SimpleMoEModel:
        """Build from a name -> tensor mapping holding `tensor_names(spec)`."""
        return cls(
            spec,
            norms={layer: tensors[f"model.layers.{layer}.input_layernorm.weight"] for layer in spec.moe_layers},
            routers={layer: tensors[spec.router_name(layer)] for layer in spec.moe_layers},
            final_norm=tensors["model.norm.weight"],
            dtype=dtype,
            device=device,
        )

    def moe_block(self, layer: int, h: torch.Tensor, experts: ExpertBackend) -> torch.Tensor:
        """One pre-norm MoE block with its residual: [T, H] -> [T, H]."""
        x = rms_norm(h, self.norms[layer], self.spec.rms_norm_eps)  # [T, H]
        weights, ids = route(router_logits(x, self.routers[layer]), self.spec.top_k, self.spec.norm_topk_prob)
        return h + experts.run(layer, x, ids, weights).to(device=h.device, dtype=h.dtype)

    def forward(self, hidden: torch.Tensor, experts: ExpertBackend) -> torch.Tensor:
        """[T, H] -> [T, H] in the model's dtype."""
        h = hidden.to(self.device, self.dtype)
        for layer in self.spec.moe_layers:
            h = self.moe_block(layer, h, experts)
        return rms_norm(h, self.final_norm, self.spec.rms_norm_eps)
