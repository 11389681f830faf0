"""`moe-serve rebalance`: move running expert servers to a placement step by step, with no failed request.

Each round loads new replicas first (the gateways route to them once they serve: the placement version
in every reply makes them fetch GetInfo), then drops old ones (a dropping server stops listing them at
once, so the gateways route away, and frees them once no call comes). An expert is only dropped while
another server holds it, and a server that is full drops what it gives away before it loads, so every
expert keeps a replica throughout. Everything is checked before the first change: experts the
checkpoint lacks, an expert left with no replica, a server without room, a change lock another
rebalance holds; each is refused naming it, and nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from moe_client.admin import AdminClient
from moe_client.ownership import Ownership, format_ranges
from moe_serve.tools.planner import ExpertGrid, PlanError, describe

Pairs = set[tuple[int, int]]


@dataclass(frozen=True)
class Step:
    """Load or drop some experts on one server."""

    kind: str  # "load" or "drop"
    server: int
    pairs: tuple[tuple[int, int], ...]

    def ownership(self) -> Ownership:
        out: dict[int, list[int]] = {}
        for layer, expert in self.pairs:
            out.setdefault(layer, []).append(expert)
        return {layer: tuple(sorted(ids)) for layer, ids in sorted(out.items())}


def pairs_of(owned: Ownership) -> Pairs:
    return {(layer, e) for layer, ids in owned.items() for e in ids}


def check_target(grid: ExpertGrid, names: Sequence[str], target: Sequence[Ownership], slots: Sequence[int],
                 expert_bytes: int) -> None:
    """PlanError naming experts the checkpoint lacks, experts with no replica, or a server without room."""
    for name, owned in zip(names, target, strict=True):
        for layer, ids in owned.items():
            if layer not in grid.moe_layers:
                raise PlanError(f"the placement gives {name} layer {layer}, which is not a MoE layer of the "
                                f"checkpoint (MoE layers {format_ranges(grid.moe_layers)})")
            bad = [e for e in ids if e >= grid.num_experts]
            if bad:
                raise PlanError(f"the placement gives {name} layer {layer} experts {format_ranges(bad)}, which the "
                                f"checkpoint lacks ({grid.num_experts} experts per layer: 0-{grid.num_experts - 1})")
    covered = set().union(*(pairs_of(o) for o in target))
    for layer in grid.moe_layers:
        lacking = [e for e in range(grid.num_experts) if (layer, e) not in covered]
        if lacking:
            raise PlanError(f"the placement leaves layer {layer} experts {format_ranges(lacking)} with no replica "
                            "(dropping the last replica of an expert is refused)")
    for name, owned, room in zip(names, target, slots, strict=True):
        count = len(pairs_of(owned))
        if count > room:
            raise PlanError(f"server {name} has no room: the placement gives it {count} experts "
                            f"({count * expert_bytes / 2**20:.2f} MiB), its capacity holds {room}")


def schedule(current: Sequence[Ownership], target: Sequence[Ownership], slots: Sequence[int]) -> list[list[Step]]:
    """Rounds of steps from `current` to `target`; within a round loads run first, then drops. Every pair
    keeps a holder at every point; PlanError when no order does that within the servers' room."""
    state = [pairs_of(o) for o in current]
    want = [pairs_of(o) for o in target]
    rounds: list[list[Step]] = []
    while any(state[s] != want[s] for s in range(len(state))):
        steps: list[Step] = []
        for s in range(len(state)):
            room = slots[s] - len(state[s])
            adds = sorted(want[s] - state[s])[: max(0, room)]
            if adds:
                steps.append(Step("load", s, tuple(adds)))
                state[s] |= set(adds)
        for s in range(len(state)):
            drops = [p for p in sorted(state[s] - want[s]) if any(p in state[t] for t in range(len(state)) if t != s)]
            if drops:
                steps.append(Step("drop", s, tuple(drops)))
                state[s] -= set(drops)
        if not steps:
            stuck = [s for s in range(len(state)) if want[s] - state[s]]
            raise PlanError(f"no order of loads and drops fits: servers {stuck} have no room for their new experts "
                            "and hold nothing another server has")
        rounds.append(steps)
    return rounds


class Rebalance:
    """Applies a target placement to running servers under their change locks."""

    def __init__(self, clients: Sequence[AdminClient], names: Sequence[str], say: Callable[[str], None] = print):
        self.clients = list(clients)
        self.names = list(names)
        self.say = say
        self.holder = f"rebalance-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def lock(self) -> None:
        """Take every server's change lock, or none: PlanError naming the holder of one taken already."""
        taken = []
        try:
            for client, name in zip(self.clients, self.names, strict=True):
                try:
                    client.acquire_lock(self.holder)
                except grpc.RpcError as err:
                    raise PlanError(f"server {name} ({client.address}) refused the change lock: "
                                    f"{err.code().name}: {err.details()}") from err
                taken.append(client)
        except BaseException:
            self.unlock(taken)
            raise

    def unlock(self, clients: Sequence[AdminClient] | None = None) -> None:
        for client in self.clients if clients is None else clients:
            with contextlib.suppress(grpc.RpcError):  # a lock not given back lapses by itself
                client.release_lock(self.holder)

    def apply(self, rounds: list[list[Step]]) -> float:
        """Run the rounds: each round's loads side by side, then its drops side by side; seconds taken."""
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, len(self.clients))) as pool:
            for number, steps in enumerate(rounds, 1):
                for kind in ("load", "drop"):
                    batch = [s for s in steps if s.kind == kind]
                    for step, seconds in zip(batch, pool.map(self._run, batch), strict=True):
                        self.say(f"  round {number}: {kind} {describe(step.ownership())} on {self.names[step.server]} "
                                 f"({seconds:.2f} s)")
        return time.monotonic() - start

    def _run(self, step: Step) -> float:
        client = self.clients[step.server]
        if step.kind == "load":
            return client.load(step.ownership(), lock_holder=self.holder).load_seconds
        return client.drop(step.ownership(), lock_holder=self.holder).drain_seconds
