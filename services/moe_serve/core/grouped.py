"""Grouped expert compute: all of one device's experts in two grouped GEMMs instead of a loop.

Tokens are sorted by expert; `torch._grouped_mm` multiplies each contiguous run of rows by its
expert's weights in one kernel (CUTLASS on Hopper in bf16; a reference loop on the CPU).
Legend: T = tokens, H = hidden, I = expert width, G = experts on the device, N = routed (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.core.experts import ExpertWeights

try:  # fused GPU kernels where Triton and a GPU exist; the torch path below is the reference
    if not torch.cuda.is_available():
        raise ImportError("no GPU")
    from moe_serve.core import triton_moe as _fused
except ImportError:
    _fused = None


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
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype

    @property
    def width(self) -> int:
        return self.down.shape[2]

    def slot_of(self, num_experts: int) -> torch.Tensor:
        """[num_experts] -> slot on this device, or -1 for experts elsewhere."""
        slots = torch.full((num_experts,), -1, dtype=torch.long)
        slots[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        return slots.to(self.device)


def _activation(gate_up: torch.Tensor, width: int, scale: torch.Tensor | None) -> torch.Tensor:
    if _fused is not None and gate_up.is_cuda and scale is not None:
        return _fused.swiglu_scale(gate_up, scale)
    gate, up = gate_up.split(width, dim=-1)
    act = F.silu(gate) * up
    return act if scale is None else act * scale[:, None].to(act.dtype)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, stacked: StackedExperts,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x [N, H] sorted by slot, `counts` [G] rows per slot -> [N, H], in two grouped GEMMs.

    `scale` [N] multiplies each row's activation before the down projection (the gate weight: the
    projection is linear, so this equals scaling the output, on a narrower tensor). Rows past
    sum(counts) are left undefined.
    """
    offs = torch.cumsum(counts, 0).to(device=x.device, dtype=torch.int32)  # [G] end row of each slot
    gate_up = torch._grouped_mm(x, stacked.gate_up.transpose(-2, -1), offs=offs)  # [N, 2I]
    act = _activation(gate_up, stacked.width, scale)  # [N, I]
    return torch._grouped_mm(act, stacked.down.transpose(-2, -1), offs=offs)  # [N, H]


def looped_swiglu(x: torch.Tensor, counts: torch.Tensor, stacked: StackedExperts,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same as grouped_swiglu with one GEMM pair per non-empty slot (dtypes or devices the kernel lacks)."""
    out = torch.empty_like(x)
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            act = _activation(F.linear(x[rows], stacked.gate_up[slot]), stacked.width,
                              None if scale is None else scale[rows])
            out[rows] = F.linear(act, stacked.down[slot])
            start += n
    return out


Swiglu = Callable[[torch.Tensor, torch.Tensor, StackedExperts, torch.Tensor | None], torch.Tensor]


def expert_sums(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, stacked: StackedExperts,
                slot_of: torch.Tensor, swiglu: Swiglu = grouped_swiglu, out: torch.Tensor | None = None,
                tally: torch.Tensor | None = None) -> torch.Tensor:
    """Per token, the gate-weighted sum of its experts that are in `stacked`: [T, H] float32.

    hidden [T, H], expert_ids [T, K] (-1, ids >= E, experts elsewhere are skipped), weights [T, K], slot_of [E]
    (slot in `stacked` or -1), all on stacked's device. No host synchronisation: every (token, slot)
    pair is sorted by slot (pairs not here sort last and are masked), run grouped, put back in
    [T, K] order and summed over K in float32 (deterministic, no atomics), into `out` if given.
    `tally` ([G] int64), if given, gets each slot's count of tokens added (the metrics' token counts).
    """
    t, k = expert_ids.shape
    g = len(stacked.expert_ids)
    flat = expert_ids.reshape(-1).long()  # [T*K]
    e = slot_of.numel()
    slot = slot_of[flat.clamp(0, e - 1)]
    valid = (flat >= 0) & (flat < e) & (slot >= 0)  # ids past E - 1 too (a device-routed call is not checked)
    key = torch.where(valid, slot, g).int()  # pairs not here sort after every slot; int32 sorts in half the passes
    sorted_key, order = torch.sort(key, stable=True)  # [T*K]
    # Rows per slot from the sorted keys: no bincount, whose output size needs a device sync.
    bounds = torch.searchsorted(sorted_key, torch.arange(g + 1, device=key.device, dtype=torch.int32))
    counts = bounds[1:] - bounds[:-1]  # [G]
    if tally is not None:
        tally.add_(counts)
    x = hidden.index_select(0, torch.div(order, k, rounding_mode="floor")).to(stacked.dtype)  # [T*K, H]
    y = swiglu(x, counts, stacked, weights.reshape(-1).float()[order])  # [T*K, H], sorted by slot
    if _fused is not None and y.is_cuda:
        return _fused.gather_sum(y, order, valid, t, k, out)
    pairs = torch.empty_like(y).index_copy_(0, order, y)  # back to [T*K] order
    pairs.masked_fill_(~valid[:, None], 0)
    return torch.sum(pairs.view(t, k, -1), dim=1, dtype=torch.float32, out=out)  # [T, H]


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
