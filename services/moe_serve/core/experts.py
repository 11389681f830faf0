"""Routed experts: the SwiGLU FFN and the grouped, gate-weighted combine over a token batch.

Legend: T = tokens, H = hidden size, I = expert width, K = experts per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: down(silu(gate x) * up x)."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    @property
    def device(self) -> torch.device:
        return self.gate.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gate.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ExpertWeights:
        """A copy on another device and/or dtype."""
        return ExpertWeights(*(w.to(device=device, dtype=dtype) for w in (self.gate, self.up, self.down)))


def swiglu(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """[N, H] -> [N, H] through one expert, in the expert's dtype."""
    return F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)


def combine(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    experts: Mapping[int, ExpertWeights],
) -> torch.Tensor:
    """Sum over each token's experts of weight * expert(token), grouped: each expert runs once.

    hidden [T, H]; expert_ids [T, K] (-1 = unused slot); weights [T, K]. Every id >= 0 must be a
    key of `experts`. Experts may live on different devices; the result is float32 on hidden's device.
    """
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, H]
    flat_ids = expert_ids.reshape(-1)  # [T*K]
    valid = flat_ids >= 0
    if not bool(valid.any()):
        return out
    slots = valid.nonzero().squeeze(1)  # [N] positions in the flattened [T*K]
    order = torch.argsort(flat_ids[slots], stable=True)
    slots = slots[order]
    sorted_ids = flat_ids[slots]
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    tokens = torch.div(slots, expert_ids.shape[1], rounding_mode="floor")  # [N]
    gate_w = weights.reshape(-1)[slots].float()  # [N]
    start = 0
    for expert, count in zip(unique_ids.tolist(), counts.tolist(), strict=True):
        rows = tokens[start:start + count]
        w = experts[expert]
        x = hidden.index_select(0, rows).to(device=w.device, dtype=w.dtype)  # [n, H]
        y = swiglu(x, w).float().to(out.device)  # [n, H]
        out.index_add_(0, rows, y * gate_w[start:start + count, None])
        start += count
    return out


class ExpertBackend(Protocol):
    """Where a MoE layer's routed experts run: in this process, or on expert servers."""

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, K], weights [T, K] -> [T, H] float32 weighted expert sum."""
        ...


class PendingExperts(Protocol):
    """Routed experts started but not yet waited for."""

    def result(self) -> torch.Tensor:
        """Wait for the [T, H] float32 weighted expert sum."""
        ...


class _Done:
    """The result of a backend that ran synchronously."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


def start_experts(experts: ExpertBackend, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                  weights: torch.Tensor) -> PendingExperts:
    """Start a layer's routed experts: a backend with `submit` returns at once, so the caller can compute
    something else (the shared experts) while they run; any other backend runs them now."""
    submit = getattr(experts, "submit", None)
    if submit is None:
        return _Done(experts.run(layer, hidden, expert_ids, weights))
    return submit(layer, hidden, expert_ids, weights)


class LocalExperts:
    """An ExpertBackend over experts held in this process: the in-process reference."""

    def __init__(self, experts: Mapping[tuple[int, int], ExpertWeights]):
        self._by_layer: dict[int, dict[int, ExpertWeights]] = {}
        for (layer, expert), w in experts.items():
            self._by_layer.setdefault(layer, {})[expert] = w

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return combine(hidden, expert_ids, weights, self._by_layer[layer])
