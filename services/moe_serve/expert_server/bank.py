"""The experts one server owns, loaded from the checkpoint onto its devices, and their grouped run.

Each device holds its experts of a layer stacked (core.grouped.StackedExperts) and runs them in two
grouped GEMMs. A request's hidden states go to each device once; the routed rows are gathered there,
and each device sums its experts' weighted outputs per token before one copy back.
Legend: T = tokens, H = hidden size, K = expert slots per token, N = routed (token, expert) pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from moe_serve.checkpoint import Checkpoint
from moe_serve.core.experts import ExpertWeights
from moe_serve.core.grouped import StackedExperts, grouped_supported, grouped_swiglu, looped_swiglu
from moe_serve.errors import InvalidArgument, NotFound
from moe_serve.placement import Ownership, format_ranges


@dataclass(frozen=True)
class Placed:
    """One owned expert and the device it lives on."""

    layer: int
    expert: int
    device: torch.device


@dataclass(frozen=True)
class _DeviceGroup:
    """One layer's experts on one device, with the expert-id -> slot table and the kernel to use."""

    stacked: StackedExperts
    slot_of: torch.Tensor  # [E] slot on this device or -1
    swiglu: Callable[[torch.Tensor, torch.Tensor, StackedExperts], torch.Tensor]


def assign_devices(expert_ids: list[int], devices: list[torch.device]) -> dict[int, torch.device]:
    """Round-robin, as the seed's multi-GPU script: the n-th owned expert goes to devices[n % len]."""
    return {e: devices[n % len(devices)] for n, e in enumerate(sorted(expert_ids))}


class ExpertBank:
    """Owned experts of some MoE layers, spread over devices, in one compute dtype."""

    def __init__(self, experts: Mapping[tuple[int, int], ExpertWeights], num_experts: int, hidden_size: int,
                 dtype: torch.dtype):
        """experts: (layer, expert) -> weights, already on their devices in `dtype`."""
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.dtype = dtype
        self._owned: dict[int, list[int]] = {}
        self._groups: dict[int, list[_DeviceGroup]] = {}
        by_layer_device: dict[tuple[int, torch.device], dict[int, ExpertWeights]] = {}
        for (layer, expert), w in sorted(experts.items()):
            self._owned.setdefault(layer, []).append(expert)
            by_layer_device.setdefault((layer, w.device), {})[expert] = w
        kernels: dict[torch.device, Callable] = {}
        for (layer, device), group in by_layer_device.items():
            if device not in kernels:
                kernels[device] = grouped_swiglu if grouped_supported(device, dtype) else looped_swiglu
            stacked = StackedExperts.stack(group)
            self._groups.setdefault(layer, []).append(_DeviceGroup(stacked, stacked.slot_of(num_experts),
                                                                   kernels[device]))

    @classmethod
    def load(cls, checkpoint: Checkpoint, owned: Ownership, devices: list[torch.device], dtype: torch.dtype,
             progress: Callable[[int, int], None] | None = None) -> ExpertBank:
        """Read only the owned experts' tensors and place them round-robin on `devices`."""
        spec = checkpoint.spec
        h, i = spec.hidden_size, spec.expert_width
        shapes = ((i, h), (i, h), (h, i))
        device_of = assign_devices(sorted(set().union(*owned.values())) if owned else [], devices)
        experts: dict[tuple[int, int], ExpertWeights] = {}
        for layer, ids in sorted(owned.items()):
            for expert in ids:
                names = spec.expert_names(layer, expert)
                tensors = [checkpoint.load(name, shape) for name, shape in zip(names, shapes, strict=True)]
                experts[layer, expert] = ExpertWeights(*tensors).to(device_of[expert], dtype)
                if progress is not None:
                    progress(layer, expert)
        return cls(experts, spec.num_experts, h, dtype)

    @property
    def owned(self) -> Ownership:
        """layer -> owned expert ids."""
        return {layer: tuple(ids) for layer, ids in sorted(self._owned.items())}

    def placement(self) -> list[Placed]:
        """Every owned (layer, expert) with its device."""
        return sorted((Placed(layer, e, g.stacked.device) for layer, groups in self._groups.items()
                       for g in groups for e in g.stacked.expert_ids), key=lambda p: (p.layer, p.expert))

    def devices(self) -> list[str]:
        """Distinct devices in use, in placement order."""
        return list(dict.fromkeys(str(p.device) for p in self.placement()))

    def nbytes(self) -> int:
        """Bytes of expert weights held."""
        return sum(t.numel() * t.element_size() for groups in self._groups.values() for g in groups
                   for t in (g.stacked.gate_up, g.stacked.down))

    def check(self, layer: int, expert_ids: torch.Tensor) -> None:
        """NOT_FOUND for a layer or expert id this server does not own; INVALID_ARGUMENT for ids below -1."""
        if layer not in self._owned:
            raise NotFound(f"layer {layer} has no experts on this server; it holds layers {sorted(self._owned)}")
        ids = torch.unique(expert_ids).tolist()
        if ids and ids[0] < -1:
            raise InvalidArgument(f"expert_ids: negative id {ids[0]} (only -1 marks an unused slot)")
        owned = set(self._owned[layer])
        unknown = [e for e in ids if e >= 0 and e not in owned]
        if unknown:
            raise NotFound(f"layer {layer}: experts {format_ranges(unknown)} are not on this server; "
                           f"it holds {format_ranges(self._owned[layer])}")

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
            weights: torch.Tensor) -> tuple[torch.Tensor, float]:
        """[T, H] float32 weighted sum over each token's owned experts, and the seconds it took."""
        self.check(layer, expert_ids)
        start = time.perf_counter()
        out = self.compute(layer, hidden, expert_ids, weights)
        return out, time.perf_counter() - start

    @torch.inference_mode()
    def compute(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """The unchecked math of `run`: every device is launched before any result is copied back."""
        k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1).long()  # [T*K]
        flat_w = weights.reshape(-1).float()
        partials = []
        for group in self._groups[layer]:
            slot = group.slot_of[flat_ids.clamp(min=0)]
            pairs = ((flat_ids >= 0) & (slot >= 0)).nonzero().squeeze(1)  # [N] positions in [T*K]
            if pairs.numel() == 0:
                continue
            slot = slot[pairs]
            order = torch.argsort(slot, stable=True)
            pairs, slot = pairs[order], slot[order]
            counts = torch.bincount(slot, minlength=len(group.stacked.expert_ids))  # [G]
            device = group.stacked.device
            tokens = torch.div(pairs, k, rounding_mode="floor").to(device, non_blocking=True)  # [N]
            gate_w = flat_w[pairs].to(device, non_blocking=True)
            x = _to_device(hidden, device, self.dtype).index_select(0, tokens)  # [N, H]
            y = group.swiglu(x, counts, group.stacked).float() * gate_w[:, None]  # [N, H]
            partials.append(torch.zeros(hidden.shape, dtype=torch.float32, device=device).index_add_(0, tokens, y))
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for partial in partials:  # copies back only after every device has its work queued
            out += partial.to("cpu")
        return out


def _to_device(hidden: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda" and hidden.device.type == "cpu":
        # Through pinned memory so the copy is asynchronous and runs at full PCIe speed.
        return hidden.pin_memory().to(device, non_blocking=True).to(dtype)
    return hidden.to(device=device, dtype=dtype)
