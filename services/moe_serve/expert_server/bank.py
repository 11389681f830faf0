"""The experts one server owns, loaded from the checkpoint onto its devices, and their grouped run.

Legend: T = tokens, H = hidden size, K = expert slots per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe_serve.checkpoint import Checkpoint
from moe_serve.core.experts import ExpertWeights, combine
from moe_serve.errors import InvalidArgument, NotFound
from moe_serve.placement import Ownership, format_ranges


@dataclass(frozen=True)
class Placed:
    """One owned expert and the device it lives on."""

    layer: int
    expert: int
    device: torch.device


class ExpertBank:
    """Owned experts of some MoE layers, spread round-robin over devices, in one compute dtype."""

    def __init__(self, experts: dict[int, dict[int, ExpertWeights]], hidden_size: int, dtype: torch.dtype):
        self.experts = experts  # layer -> expert -> weights
        self.hidden_size = hidden_size
        self.dtype = dtype

    @classmethod
    def load(cls, checkpoint: Checkpoint, owned: Ownership, devices: list[torch.device],
             dtype: torch.dtype, progress=None) -> ExpertBank:
        """Read only the owned experts' tensors; expert e goes to devices[position of e % len(devices)]."""
        spec = checkpoint.spec
        h, i = spec.hidden_size, spec.expert_width
        shapes = ((i, h), (i, h), (h, i))
        experts: dict[int, dict[int, ExpertWeights]] = {}
        all_ids = sorted(set().union(*owned.values())) if owned else []
        device_of = {e: devices[n % len(devices)] for n, e in enumerate(all_ids)}
        for layer, ids in sorted(owned.items()):
            for expert in ids:
                names = spec.expert_names(layer, expert)
                tensors = [checkpoint.load(name, shape) for name, shape in zip(names, shapes)]
                experts.setdefault(layer, {})[expert] = ExpertWeights(*tensors).to(device_of[expert], dtype)
                if progress is not None:
                    progress(layer, expert)
        return cls(experts, h, dtype)

    @property
    def owned(self) -> Ownership:
        """layer -> owned expert ids."""
        return {layer: tuple(sorted(e)) for layer, e in sorted(self.experts.items())}

    def placement(self) -> list[Placed]:
        """Every owned (layer, expert) with its device."""
        return [Placed(layer, expert, w.device) for layer, by_id in sorted(self.experts.items())
                for expert, w in sorted(by_id.items())]

    def devices(self) -> list[str]:
        """Distinct devices in use, in placement order."""
        return list(dict.fromkeys(str(p.device) for p in self.placement()))

    def nbytes(self) -> int:
        """Bytes of expert weights held."""
        return sum(t.numel() * t.element_size() for by_id in self.experts.values() for w in by_id.values()
                   for t in (w.gate, w.up, w.down))

    def check(self, layer: int, expert_ids: torch.Tensor) -> None:
        """NOT_FOUND for a layer or expert id this server does not own; INVALID_ARGUMENT for ids below -1."""
        if layer not in self.experts:
            raise NotFound(f"layer {layer} has no experts on this server; it holds layers {sorted(self.experts)}")
        ids = torch.unique(expert_ids).tolist()
        if ids and ids[0] < -1:
            raise InvalidArgument(f"expert_ids: negative id {ids[0]} (only -1 marks an unused slot)")
        unknown = [e for e in ids if e >= 0 and e not in self.experts[layer]]
        if unknown:
            raise NotFound(
                f"layer {layer}: experts {format_ranges(unknown)} are not on this server; "
                f"it holds {format_ranges(list(self.experts[layer]))}"
            )

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
            weights: torch.Tensor) -> tuple[torch.Tensor, float]:
        """[T, H] float32 weighted sum over each token's owned experts, and the seconds it took."""
        self.check(layer, expert_ids)
        start = time.perf_counter()
        out = combine(hidden, expert_ids.long(), weights, self.experts[layer])
        return out, time.perf_counter() - start
