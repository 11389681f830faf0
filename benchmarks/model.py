"""The benchmarked MoE layer: DeepSeek-MoE-16B's shape with random weights, as a generated checkpoint.

The checkpoint is the embedded model type (simple_moe) with one MoE layer at DeepSeek-MoE-16B's
shape and routing (softmax, top-6, no renormalisation), written once and reused, so every process
loads identical experts the way real servers do (ExpertBank.load).
Legend: T = tokens, H = hidden size, E = routed experts, K = top-k.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_serve.core.routing import route, router_logits
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.synthetic import SyntheticConfig, write_checkpoint

LAYER = 0


@dataclass(frozen=True)
class Shape:
    """One MoE layer; the default is DeepSeek-MoE-16B's (hidden 2048, 64 experts of width 1408, top-6)."""

    hidden: int = 2048
    width: int = 1408
    experts: int = 64
    top_k: int = 6
    seed: int = 0

    def config(self) -> SyntheticConfig:
        """The checkpoint's config: one MoE layer, DeepSeek routing (no top-k renormalisation)."""
        return SyntheticConfig(hidden_size=self.hidden, intermediate_size=self.width, num_hidden_layers=1,
                               num_experts=self.experts, num_experts_per_tok=self.top_k, norm_topk_prob=False,
                               seed=self.seed)

    def owned_by(self, rank: int, workers: int) -> str:
        """Experts of worker `rank` (1-based) as a range: contiguous shares, like the seed's expert_assignments."""
        per = -(-self.experts // workers)
        return f"{(rank - 1) * per}-{min(rank * per, self.experts) - 1}"


def owner_table(shape: Shape, workers: int) -> torch.Tensor:
    """[E] index of the worker that owns each expert, as Shape.owned_by splits them."""
    per = -(-shape.experts // workers)
    return torch.arange(shape.experts) // per


def ensure_checkpoint(shape: Shape, root: Path) -> Path:
    """The generated checkpoint for `shape` under `root`, written on first use (2.2 GB at full size)."""
    path = root / f"moe-layer-h{shape.hidden}-e{shape.experts}x{shape.width}-k{shape.top_k}-s{shape.seed}"
    if not (path / "config.json").is_file():
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_checkpoint(partial, shape.config())
        partial.rename(path)
    return path


class InProcess:
    """ExpertBackend with every expert in this process: the expert server's own bank and kernels."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype):
        owned = {LAYER: tuple(range(checkpoint.spec.num_experts))}
        self.bank = ExpertBank.load(checkpoint, owned, [torch.device("cpu")], dtype)

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.bank.run(layer, hidden, expert_ids, weights)[0]


def make_input(shape: Shape, tokens: int) -> torch.Tensor:
    """[T, H] hidden states, fixed per token count."""
    gen = torch.Generator().manual_seed(shape.seed * 100_003 + 7 * tokens + 1)
    return torch.randn(tokens, shape.hidden, generator=gen)


def moe_layer(x: torch.Tensor, router: torch.Tensor, top_k: int, experts) -> torch.Tensor:
    """[T, H] -> [T, H]: route (softmax, top-k, no renormalisation), then the experts' weighted sum."""
    weights, ids = route(router_logits(x, router), top_k, renormalize=False)  # [T, K]
    return experts.run(LAYER, x, ids, weights)
