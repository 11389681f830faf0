"""An ExpertBackend over stacked experts in this process, with no host synchronisation on the GPU.

The one-process decode step can capture its expert calls together with the dense stages into one
CUDA graph when the backend never waits on the device: `capturable` says whether it does not
(grouped bf16 GEMMs on a GPU; the looped fallback and float32 grouped_mm read counts on the host).
Legend: T = tokens, H = hidden size, K = top-k.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moe_serve.core.experts import ExpertWeights
from moe_serve.core.grouped import StackedExperts, expert_sums, grouped_supported, grouped_swiglu, looped_swiglu


class GroupedExperts:
    """Every routed expert of some layers on one device, each layer's stacked for grouped GEMMs."""

    def __init__(self, layers: Mapping[int, StackedExperts], num_experts: int):
        self.layers = dict(layers)
        self.slot_of = {layer: s.slot_of(num_experts) for layer, s in self.layers.items()}
        first = next(iter(self.layers.values()))
        grouped = grouped_supported(first.device, first.dtype)
        self.swiglu = grouped_swiglu if grouped else looped_swiglu
        self.capturable = grouped and first.device.type == "cuda" and first.dtype == torch.bfloat16

    @classmethod
    def stack(cls, experts: Mapping[tuple[int, int], ExpertWeights], num_experts: int) -> GroupedExperts:
        """From (layer, expert) -> weights, all on one device in one dtype."""
        by_layer: dict[int, dict[int, ExpertWeights]] = {}
        for (layer, expert), w in experts.items():
            by_layer.setdefault(layer, {})[expert] = w
        return cls({layer: StackedExperts.stack(group) for layer, group in by_layer.items()}, num_experts)

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, K] (-1: none), weights [T, K] -> [T, H] float32 weighted sum."""
        return expert_sums(hidden, expert_ids, weights, self.layers[layer], self.slot_of[layer], self.swiglu)
