"""What `moe-serve plan` and `rebalance` read from running expert servers: ownership, room and token counts.

Load is each (layer, expert)'s tokens summed over the servers that counted them (their
moe_expert_tokens_total counters, through AdminService.GetExpertLoad), either since the servers started
or over a window (two readings `window` seconds apart), or from Prometheus' increase() over a window.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from moe_client.admin import AdminClient
from moe_client.ownership import Ownership, from_messages
from moe_client.security import TLSFiles
from moe_serve.tools.planner import ExpertGrid, ServerRoom


@dataclass(frozen=True)
class Cluster:
    """The expert servers as read now."""

    grid: ExpertGrid
    servers: list[ServerRoom]
    expert_bytes: int
    tokens: dict[tuple[int, int], float]  # (layer, expert) -> tokens, summed over servers


def connect(addresses: Sequence[str], tls: TLSFiles | None, token: str | None,
            timeout: float = 60.0) -> list[AdminClient]:
    """One AdminClient per address."""
    return [AdminClient(a, timeout=timeout, tls=tls, token=token) for a in addresses]


def _counts(clients: Sequence[AdminClient]) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for client in clients:
        for item in client.expert_load().experts:
            key = (item.layer, item.expert)
            out[key] = out.get(key, 0.0) + item.tokens
    return out


def read_cluster(clients: Sequence[AdminClient], window: float = 0.0, prometheus: str = "") -> Cluster:
    """Ownership, room and load of every server; ValueError when they serve different checkpoints."""
    infos = [c.info() for c in clients]
    prints = {i.model_fingerprint for i in infos}
    if len(prints) != 1:
        raise ValueError("the servers serve different checkpoints: " + ", ".join(
            f"{c.address} {i.model_fingerprint}" for c, i in zip(clients, infos, strict=True)))
    loads = [c.expert_load() for c in clients]
    grid = ExpertGrid(tuple(infos[0].moe_layers), infos[0].num_experts)
    servers = [ServerRoom(i.server_name or c.address, c.address, sum(d.capacity_bytes for d in load.devices),
                          from_messages(i.owned)) for c, i, load in zip(clients, infos, loads, strict=True)]
    if prometheus:
        tokens = prometheus_tokens(prometheus, window or 300.0)
    elif window > 0:
        before = _counts(clients)
        time.sleep(window)
        after = _counts(clients)
        tokens = {k: v - before.get(k, 0.0) for k, v in after.items()}
    else:
        tokens = _counts(clients)
    return Cluster(grid, servers, loads[0].expert_bytes, tokens)


def prometheus_tokens(url: str, window: float) -> dict[tuple[int, int], float]:
    """Tokens per (layer, expert) counted over the last `window` seconds, from a Prometheus at `url`.

    The counters' own difference over the window (a series younger than the window counts from zero), not
    increase(): that extrapolates each series from its own samples, and two servers scraped at other
    moments came back scaled 1.02x and 1.27x, enough to reorder the experts a plan ranks. A server that
    restarted within the window counts 0 for it (its counter went down)."""
    w = max(1, int(window))
    query = (f"sum by (layer, expert) (clamp_min(moe_expert_tokens_total - (moe_expert_tokens_total offset {w}s "
             f"or moe_expert_tokens_total * 0), 0))")
    target = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(target, timeout=30) as reply:
            doc = json.load(reply)
    except (OSError, ValueError) as err:
        raise ValueError(f"Prometheus at {url}: {err}") from err
    if doc.get("status") != "success":
        raise ValueError(f"Prometheus at {url}: {doc.get('error', doc)}")
    return {(int(r["metric"]["layer"]), int(r["metric"]["expert"])): float(r["value"][1])
            for r in doc["data"]["result"]}


def owned_now(clients: Sequence[AdminClient]) -> list[Ownership]:
    """What each server's GetInfo lists now."""
    return [c.owned() for c in clients]
