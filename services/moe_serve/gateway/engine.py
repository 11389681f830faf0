"""The gateway's model runner: dense layers here, routed experts through an ExpertBackend."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from moe_serve.core.experts import ExpertBackend
from moe_serve.core.simple_model import SimpleMoEModel


@dataclass
class ForwardStats:
    """Where one request's time went."""

    total_seconds: float = 0.0
    expert_seconds: float = 0.0


class _TimedBackend:
    """Adds the time spent waiting on experts to the calling thread's current ForwardStats."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner
        self.local = threading.local()

    def run(self, layer, hidden, expert_ids, weights):
        start = time.perf_counter()
        try:
            return self.inner.run(layer, hidden, expert_ids, weights)
        finally:
            stats = getattr(self.local, "stats", None)
            if stats is not None:
                stats.expert_seconds += time.perf_counter() - start


class GatewayEngine:
    """Runs Forward over the dense model; thread-safe, called from worker threads."""

    def __init__(self, model: SimpleMoEModel, experts: ExpertBackend):
        self.model = model
        self.experts = _TimedBackend(experts)

    @property
    def hidden_size(self) -> int:
        return self.model.spec.hidden_size

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ForwardStats]:
        """[..., H] -> [..., H] through the MoE stack, with timings."""
        stats = ForwardStats()
        self.experts.local.stats = stats
        start = time.perf_counter()
        try:
            flat = hidden.reshape(-1, self.hidden_size)  # [T, H]
            out = self.model.forward(flat, self.experts).reshape(hidden.shape)
        finally:
            self.experts.local.stats = None
        stats.total_seconds = time.perf_counter() - start
        return out, stats
