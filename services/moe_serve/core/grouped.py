"""Grouped expert compute: all of one device's experts in two grouped GEMMs instead of a loop.

Tokens are sorted by expert; `torch._grouped_mm` multiplies each contiguous run of rows by its
expert's weights in one kernel (CUTLASS on Hopper in bf16; a reference loop on the CPU).
Legend: T = tokens, H = hidden, I = expert width, G = experts on the device, N = routed (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.experts import ExpertWeights


@dataclass(frozen=True)
class StackedExperts:
    """Experts of one device, stacked: gate and up fused along the output dim, as nn.Linear weights."""

    expert_ids: tuple[int, ...]  # global expert id of each stacked slot
    gate_up: torch.Tensor  # [G, 2I, H]
    down: torch.Tensor  # [G, H, I]

    @classmethod
    def stack(cls, experts: Mapping[int, ExpertWeights]) -> StackedExperts:
        """Stack experts that share a device and dtype (slot order = sorted expert id)."""
        ids = tuple(sorted(experts))
        gate_up = torch.stack([torch.cat([experts[e].gate, experts[e].up], dim=0) for e in ids])
        down = torch.stack([experts[e].down for e in ids])
        return cls(ids, gate_up, down)

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    @property
    def width(self) -> int:
        return self.down.shape[2]

    def slot_of(self, num_experts: int) -> torch.Tensor:
        """[num_experts] -> slot on this device, or -1 for experts elsewhere."""
        slots = torch.full((num_experts,), -1, dtype=torch.long)
        slots[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        return slots


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, stacked: StackedExperts) -> torch.Tensor:
    """Rows of x [N, H], sorted by slot with `counts` [G] rows per slot -> [N, H], two grouped GEMMs."""
    offs = torch.cumsum(counts, 0).to(device=x.device, dtype=torch.int32)  # [G] end row of each slot
    gate_up = torch._grouped_mm(x, stacked.gate_up.transpose(-2, -1), offs=offs)  # [N, 2I]
    gate, up = gate_up.split(stacked.width, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, stacked.down.transpose(-2, -1), offs=offs)  # [N, H]


def looped_swiglu(x: torch.Tensor, counts: torch.Tensor, stacked: StackedExperts) -> torch.Tensor:
    """Same result as grouped_swiglu, one GEMM pair per non-empty slot (for dtypes the kernel lacks)."""
    out = torch.empty_like(x)
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            gate, up = F.linear(x[rows], stacked.gate_up[slot]).split(stacked.width, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, stacked.down[slot])
            start += n
    return out


def grouped_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype here (probed once with a tiny call)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, device=device, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)
        torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([1, 4], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False
