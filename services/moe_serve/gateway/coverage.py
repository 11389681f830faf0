"""The gateway's health follows its experts' coverage: NOT_SERVING while some (layer, expert) has no live
replica, since then every Forward and Generate fails, and load balancers, Docker and Kubernetes should stop
sending traffic. Also the gauges behind the alerts: `moe_expert_server_up{server}` and
`moe_unserved_experts`.

A replica is live while it is SERVING and serves the gateway's checkpoint; one skipped for a moment after
a failed call still counts (the dispatcher tries it when it is the last).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from moe_client.ownership import format_ranges
from moe_serve.gateway.pool import ServerPool
from moe_serve.observability.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class CoverageHealth:
    """Recomputes coverage on every pool change; sets the gauges and, when it flips, the health."""

    def __init__(self, pool: ServerPool, metrics: ServiceMetrics, set_serving: Callable[[bool], Awaitable]):
        self.pool = pool
        self.metrics = metrics
        self.set_serving = set_serving
        self.serving: bool | None = None  # as last set
        self._servers: set[str] = set()  # label values set, so a server gone (or renamed) is removed

    def unserved(self) -> dict[int, list[int]]:
        """layer -> experts no live replica owns."""
        owners, out = self.pool.owners, {}
        for layer in self.pool.spec.moe_layers:
            by_expert = owners.get(layer, {})
            lacking = [e for e in range(self.pool.spec.num_experts)
                       if not any(r.serving and not r.refused for r in by_expert.get(e, ()))]
            if lacking:
                out[layer] = lacking
        return out

    def update(self) -> None:
        """Gauges now; the health status too if it changed (on the running event loop)."""
        up = self.metrics.expert_server_up
        names = set()
        for replica in self.pool.members:
            names.add(replica.name)
            up.labels(replica.name).set(1 if replica.serving and not replica.refused else 0)
        for gone in self._servers - names:
            up.remove(gone)
        self._servers = names
        unserved = self.unserved()
        self.metrics.unserved_experts.set(sum(len(e) for e in unserved.values()))
        serving = not unserved
        if serving != self.serving:
            self.serving = serving
            if serving:
                log.info("every (layer, expert) has a live replica: health SERVING")
            else:
                log.warning("health NOT_SERVING: no live replica for %s",
                            "; ".join(f"layer {layer} experts {format_ranges(e)}" for layer, e in unserved.items()))
            asyncio.get_running_loop().create_task(self.set_serving(serving))
