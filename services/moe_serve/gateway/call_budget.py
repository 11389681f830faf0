"""How long one RunExperts attempt may take before the dispatcher gives up on it and fails over.

A dead link (a cable pulled, a host frozen) answers nothing: no RST, no GOAWAY. Keepalive notices it
only after --keepalive twice (20 s by default), and --rpc-timeout (60 s) is a bound on a healthy but
slow call. So with the defaults a cut link was not noticed while it lasted and calls ran into their
callers' deadlines. Here each attempt gets a budget from the latency the gateway observes: a few times
the slowest recent call, at least MIN_BUDGET, at most --rpc-timeout. Past it the attempt is abandoned
and its experts go to another replica (the dispatcher's failover), so a cut replica costs about a
second. The budget applies only when another live replica owns every expert of the sub-batch: the
last one left gets the full --rpc-timeout.
"""

from __future__ import annotations

from collections import deque

from moe_serve.gateway.pool import Replica, ServerPool

MIN_BUDGET = 1.0  # seconds: well above a loaded 2-core machine's slowest small call (docs/reliability.md)
FACTOR = 4.0  # budget = FACTOR x the slowest of the recent calls
WINDOW = 64  # recent successful calls remembered


class CallBudget:
    """Per-attempt timeouts from observed RunExperts latency."""

    def __init__(self, pool: ServerPool, rpc_timeout: float):
        self.pool = pool
        self.rpc_timeout = rpc_timeout
        self.recent: deque[float] = deque(maxlen=WINDOW)

    def observe(self, seconds: float) -> None:
        """A successful call took `seconds`."""
        self.recent.append(seconds)

    def budget(self) -> float:
        """The timeout of an attempt that can fail over."""
        slowest = max(self.recent, default=0.0)
        return min(self.rpc_timeout, max(MIN_BUDGET, FACTOR * slowest))

    def timeout(self, replica: Replica, layer: int, experts: list[int], excluded: frozenset[str]) -> float:
        """The budget if another live replica owns all of `experts`, else the full --rpc-timeout."""
        if len(self.pool.members) < 2:  # no other replica at all
            return self.rpc_timeout
        by_expert = self.pool.owners.get(layer, {})
        gone = excluded | {replica.address}
        for expert in experts:
            if not any(r.serving and not r.refused and r.address not in gone for r in by_expert.get(expert, ())):
                return self.rpc_timeout
        return self.budget()
