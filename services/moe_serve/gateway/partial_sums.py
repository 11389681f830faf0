"""A MoE layer's partial sums, one per expert-server call, added into the layer's output in a fixed order."""

from __future__ import annotations

import torch

Partial = tuple[int, torch.Tensor, torch.Tensor]  # (first expert of the call, rows [T'], [T', H] partial sum)


def add_partials(partials: list[Partial], out: torch.Tensor) -> torch.Tensor:
    """Add each partial sum into `out` ([T, H] float32) by row, ordered by first expert: the same input gives
    the same sum whichever call answered first (gRPC, the same-host channel or a failover)."""
    for _, rows, partial in sorted(partials, key=lambda p: p[0]):
        out.index_add_(0, rows.to(out.device), partial.to(out.device, torch.float32))
    return out
