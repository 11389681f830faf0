"""The gateway's per-layer routing plan on the host: gateway/routing_plan.py against the sort-based form
it replaced (torch.unique for the per-expert counts, torch.isin for each server's rows), side by side.

DeepSeek-MoE-16B's routing (64 experts, top-6) from random router logits; experts split evenly over S
servers; one torch thread (the gateway's host work is small and runs beside the dense layers). Prints
the median milliseconds per layer (counts once, rows for every server) and the ratio.

    python benchmarks/routing_plan.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_serve.core.routing import route
from moe_serve.gateway.routing_plan import expert_counts, rows_for


def sorted_counts(expert_ids: torch.Tensor, num_experts: int) -> dict[int, int]:
    experts, counts = torch.unique(expert_ids[expert_ids >= 0], return_counts=True)
    return dict(zip(experts.tolist(), counts.tolist(), strict=True))


def sorted_rows(expert_ids: torch.Tensor, chosen: list[int], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    mine = torch.isin(expert_ids, torch.tensor(chosen, dtype=expert_ids.dtype))
    rows = mine.any(dim=1).nonzero().squeeze(1)
    return rows, torch.where(mine, expert_ids, -1).index_select(0, rows).to(torch.int32)


def plan(counts_fn, rows_fn, expert_ids: torch.Tensor, servers: list[list[int]], num_experts: int):
    counts = counts_fn(expert_ids, num_experts)
    return counts, [rows_fn(expert_ids, chosen, num_experts) for chosen in servers]


def median_ms(variants: list[tuple], args: tuple, repeats: int) -> list[float]:
    """Median ms of plan(*variant, *args) per variant; the variants take turns within each repeat, so a
    burst of outside load hits them alike."""
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats + 1):  # the first round warms up
        for i, variant in enumerate(variants):
            start = time.perf_counter()
            plan(*variant, *args)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t[1:]) * 1e3 for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1,64,512,4096,16384")
    p.add_argument("--servers", default="2,4")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'tokens':>7} {'servers':>7} {'sorted ms':>10} {'lookup ms':>10} {'ratio':>6}")
    for tokens in map(int, args.tokens.split(",")):
        _, expert_ids = route(torch.randn(tokens, args.experts), args.top_k, False)
        for n in map(int, args.servers.split(",")):
            servers = [list(range(i * args.experts // n, (i + 1) * args.experts // n)) for i in range(n)]
            new = plan(expert_counts, rows_for, expert_ids, servers, args.experts)
            old = plan(sorted_counts, sorted_rows, expert_ids, servers, args.experts)
            assert new[0] == old[0] and all(torch.equal(a, b) for x, y in zip(new[1], old[1], strict=True)
                                            for a, b in zip(x, y, strict=True))
            t_old, t_new = median_ms([(sorted_counts, sorted_rows), (expert_counts, rows_for)],
                                     (expert_ids, servers, args.experts), args.repeats)
            print(f"{tokens:>7} {n:>7} {t_old:>10.3f} {t_new:>10.3f} {t_old / t_new:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
