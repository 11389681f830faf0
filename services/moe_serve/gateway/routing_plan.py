"""Which of a MoE layer's routed tokens go to which expert server: host tensor code, no I/O.

Legend: T = tokens, K = top-k, E = routed experts. Expert ids are -1 (no expert) or 0..E-1.
They run for every MoE layer (rows_for once per server) on the gateway's host, so they avoid sorts: with
DeepSeek-MoE-16B's routing (E 64, K 6) at 4,096 tokens and 2 servers the whole plan took 0.53 ms against
2.38 ms with `torch.unique` and `torch.isin` on the 2-core development machine
(`python benchmarks/routing_plan.py`).
"""

from __future__ import annotations

import torch


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> dict[int, int]:
    """expert_ids [T, K] -> {expert: its (token, expert) pairs}, for the experts with any.

    Ids past num_experts - 1 are counted too (no server owns them: the layer then fails naming them)."""
    counts = torch.bincount(expert_ids.reshape(-1) + 1, minlength=num_experts + 1)[1:]  # -1 lands in bin 0
    experts = counts.nonzero().squeeze(1)
    return dict(zip(experts.tolist(), counts[experts].tolist(), strict=True))


def rows_for(expert_ids: torch.Tensor, chosen: list[int], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens with at least one expert in `chosen`, and their ids with the other experts set to -1:
    rows [T'] int64, ids [T', K] int32 (what a RunExperts call to the server running `chosen` carries).

    Every id must be below num_experts (the dispatcher plans only layers whose experts all have owners)."""
    member = torch.zeros(num_experts + 1, dtype=torch.bool)  # by expert id; id -1 reads the last entry, False
    member[chosen] = True
    mine = member[expert_ids]  # [T, K]
    rows = mine.any(dim=1).nonzero().squeeze(1)
    ids = torch.where(mine, expert_ids, -1).index_select(0, rows).to(torch.int32)
    return rows, ids


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in host memory; those on a GPU copied into page-locked memory behind one synchronisation
    (two plain .cpu() calls would wait for the stream twice)."""
    if not any(t.is_cuda for t in tensors):
        return tensors
    out = []
    for t in tensors:
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # from torch's caching host allocator
            host.copy_(t, non_blocking=True)
            out.append(host)
        else:
            out.append(t)
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
    return tuple(out)
