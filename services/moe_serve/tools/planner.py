"""Expert placement from observed load, in the spirit of DeepSeek's EPLB: replicate the hottest experts,
then pack replicas by load, within each server's bytes. Pure functions of load and capacity.

For each MoE layer on its own (a layer's calls run side by side, so its busiest server sets its time):
1. every expert gets one replica; each extra replica goes to the expert with the most load per replica
   (tokens / replicas), up to one replica per server;
2. replicas, heaviest first (an expert's load split evenly over its replicas, as the gateway's
   least-outstanding-work choice does over time), go to the server with the least load so far that
   does not hold that expert yet and has room for one more; among equals, one that holds it already
   (fewer experts move). An extra replica that finds no such server is left out.
Balance is busiest server over the mean: 1.0 is perfect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moe_client.ownership import Ownership, format_ranges

Load = Mapping[tuple[int, int], float]  # (layer, expert) -> tokens


class PlanError(ValueError):
    """No placement fits: names the layer, expert or server and the bytes."""


@dataclass(frozen=True)
class ExpertGrid:
    """Which (layer, expert) pairs a checkpoint has."""

    moe_layers: tuple[int, ...]
    num_experts: int


@dataclass(frozen=True)
class ServerRoom:
    """One expert server as the planner sees it."""

    name: str
    address: str
    capacity_bytes: int  # expert bytes it may hold, all devices together
    owned: Ownership  # what it holds now


def server_loads(grid: ExpertGrid, load: Load, owned: Sequence[Ownership], layer: int) -> list[float]:
    """Each server's share of `layer`'s tokens, an expert's load split evenly over its replicas."""
    out = [0.0] * len(owned)
    for expert in range(grid.num_experts):
        holders = [s for s, o in enumerate(owned) if expert in o.get(layer, ())]
        for s in holders:
            out[s] += load.get((layer, expert), 0.0) / len(holders)
    return out


def imbalance(grid: ExpertGrid, load: Load, owned: Sequence[Ownership]) -> tuple[float, float]:
    """(busiest over mean of the servers' total loads, the worst layer's busiest over mean)."""
    totals = [0.0] * len(owned)
    worst = 1.0
    for layer in grid.moe_layers:
        per = server_loads(grid, load, owned, layer)
        totals = [a + b for a, b in zip(totals, per, strict=True)]
        if sum(per) > 0:
            worst = max(worst, max(per) / (sum(per) / len(per)))
    mean = sum(totals) / len(totals)
    return (max(totals) / mean if mean > 0 else 1.0), worst


def replica_counts(loads: Sequence[float], extra: int, most: int) -> list[int]:
    """One replica per expert plus `extra`, each to the expert with the most load per replica (at most `most`)."""
    counts = [1] * len(loads)
    for _ in range(extra):
        open_ = [e for e in range(len(loads)) if counts[e] < most]
        if not open_:
            break
        best = max(open_, key=lambda e: (loads[e] / counts[e], -e))
        counts[best] += 1
    return counts


def plan(grid: ExpertGrid, load: Load, servers: Sequence[ServerRoom], expert_bytes: int,
         redundant: int | None = None) -> list[Ownership]:
    """New ownership per server (same order as `servers`); `redundant` extra replicas per layer (default:
    one per server), fewer if the servers' bytes do not hold them. PlanError when even one replica each
    does not fit."""
    if not servers:
        raise PlanError("no servers to place experts on")
    slots = [s.capacity_bytes // expert_bytes for s in servers]
    layers = list(grid.moe_layers)
    needed = len(layers) * grid.num_experts
    if sum(slots) < needed:
        raise PlanError(f"the servers hold {sum(slots)} experts of {expert_bytes / 2**20:.2f} MiB in all "
                        f"({', '.join(f'{s.name}: {n}' for s, n in zip(servers, slots, strict=True))}); the "
                        f"checkpoint has {needed} ({len(layers)} layers x {grid.num_experts})")
    extra = len(servers) if redundant is None else redundant
    free = list(slots)
    owned: list[dict[int, list[int]]] = [{} for _ in servers]
    for j, layer in enumerate(layers):
        left = len(layers) - j
        quota = [-(-f // left) for f in free]  # this layer's share of each server's room, rounded up
        spare = min((sum(free) - grid.num_experts * left) // left, sum(quota) - grid.num_experts)
        loads = [max(float(load.get((layer, e), 0.0)), 1e-9) for e in range(grid.num_experts)]
        counts = replica_counts(loads, max(0, min(extra, spare)), sum(q > 0 for q in quota))
        replicas = sorted(((loads[e] / counts[e], e) for e in range(grid.num_experts) for _ in range(counts[e])),
                          key=lambda item: (-item[0], item[1]))
        level = [0.0] * len(servers)
        for share, expert in replicas:
            fits = [s for s in range(len(servers)) if quota[s] > 0 and expert not in owned[s].get(layer, ())]
            if not fits:  # only an extra replica can miss out (a first one fits anywhere with room): skip it
                continue
            best = min(fits, key=lambda s: (level[s], expert not in servers[s].owned.get(layer, ()), s))
            owned[best].setdefault(layer, []).append(expert)
            level[best] += share
            free[best] -= 1
            quota[best] -= 1
    return [{layer: tuple(sorted(ids)) for layer, ids in sorted(o.items())} for o in owned]


def describe(owned: Ownership) -> str:
    """'0:0-3,6; 1:2' for printing."""
    return "; ".join(f"{layer}:{format_ranges(ids)}" for layer, ids in sorted(owned.items()) if ids) or "nothing"
