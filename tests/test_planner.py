"""The EPLB-style planner and the rebalance schedule: pure functions of load, capacity and placement."""

import numpy as np
import pytest

from moe_serve.tools.planner import ExpertGrid, PlanError, ServerRoom, imbalance, plan, replica_counts
from moe_serve.tools.rebalance import check_target, pairs_of, schedule

GRID = ExpertGrid((1, 2), 8)


def contiguous(servers: int) -> list[dict]:
    per = GRID.num_experts // servers
    return [{layer: tuple(range(s * per, (s + 1) * per)) for layer in GRID.moe_layers} for s in range(servers)]


def skewed_load(rng, hot: int = 2) -> dict:
    """Fresh loads with `hot` experts per layer 3-5x the others (as a biased router gives)."""
    load = {}
    for layer in GRID.moe_layers:
        base = rng.uniform(50, 100, GRID.num_experts)
        hot_ids = rng.choice(GRID.num_experts, hot, replace=False)
        base[hot_ids] *= rng.uniform(3, 5, hot)
        load.update({(layer, e): float(base[e]) for e in range(GRID.num_experts)})
    return load


def test_replicas_go_to_the_hottest():
    assert replica_counts([10.0, 1.0, 1.0], extra=3, most=3) == [3, 2, 1]  # 10/2 > 1, 10/3 > 1/1, then 1/1 vs 3.3
    assert replica_counts([10.0, 1.0], extra=5, most=2) == [2, 2]  # at most one replica per server


@pytest.mark.parametrize("trial", range(20))
def test_plan_balances_skewed_load(trial):
    rng = np.random.default_rng()
    load = skewed_load(rng)
    owned = contiguous(4)
    servers = [ServerRoom(f"w{i}", f"a{i}", 10**9, o) for i, o in enumerate(owned)]
    new = plan(GRID, load, servers, expert_bytes=1000)
    for layer in GRID.moe_layers:  # every expert placed, never twice on one server
        assert set().union(*(set(o[layer]) for o in new)) == set(range(8))
    # Greedy packing onto the least loaded server ends each server within one replica share of the mean
    # (when a server got its last replica it was the least loaded, so at most the mean), and the largest
    # share is the hottest expert's load over its replicas.
    for layer in GRID.moe_layers:
        loads = [load[(layer, e)] for e in range(8)]
        share = max(w / r for w, r in zip(loads, replica_counts(loads, 4, 4), strict=True))
        per_server = [sum(load[(layer, e)] / sum(e in o[layer] for o in new) for e in o[layer]) for o in new]
        assert max(per_server) <= sum(loads) / 4 + share + 1e-9


def test_plan_respects_capacity():
    load = skewed_load(np.random.default_rng())
    servers = [ServerRoom(f"w{i}", "", cap, o) for i, (cap, o) in enumerate(zip([4000, 4000, 9000, 9000],
                                                                              contiguous(4), strict=True))]
    new = plan(GRID, load, servers, expert_bytes=1000)
    assert [len(pairs_of(o)) for o in new][:2] == [4, 4]  # full, not over
    small = [ServerRoom(f"w{i}", "", 3000, o) for i, o in enumerate(contiguous(4))]
    with pytest.raises(PlanError, match=r"hold 12 experts .* the checkpoint has 16"):
        plan(GRID, load, small, expert_bytes=1000)


def test_check_target_names_bad_input():
    names = ["w0", "w1"]
    ok = contiguous(2)
    with pytest.raises(PlanError, match=r"gives w1 layer 2 experts 9, which the checkpoint lacks"):
        check_target(GRID, names, [ok[0], {1: (4, 5, 6, 7), 2: (4, 5, 6, 7, 9)}], [16, 16], 1000)
    with pytest.raises(PlanError, match=r"gives w0 layer 3, which is not a MoE layer"):
        check_target(GRID, names, [{**ok[0], 3: (0,)}, ok[1]], [16, 16], 1000)
    with pytest.raises(PlanError, match=r"leaves layer 1 experts 7 with no replica"):
        check_target(GRID, names, [ok[0], {1: (4, 5, 6), 2: (4, 5, 6, 7)}], [16, 16], 1000)
    with pytest.raises(PlanError, match=r"server w0 has no room: the placement gives it 8 experts"):
        check_target(GRID, names, ok, [7, 16], 1000)


def test_schedule_keeps_a_replica_throughout():
    rng = np.random.default_rng()
    current = contiguous(4)
    servers = [ServerRoom(f"w{i}", "", 10**9, o) for i, o in enumerate(current)]
    target = plan(GRID, skewed_load(rng), servers, 1000)
    both = [len(pairs_of(c) | pairs_of(t)) for c, t in zip(current, target, strict=True)]
    for slots in ([100] * 4, both):  # roomy servers, then servers with room for just before and after together
        state = [pairs_of(o) for o in current]
        everything = set().union(*state)
        for steps in schedule(current, target, slots):
            for step in sorted(steps, key=lambda s: s.kind != "load"):  # loads first, as Rebalance.apply runs them
                if step.kind == "load":
                    state[step.server] |= set(step.pairs)
                    assert len(state[step.server]) <= slots[step.server]
                else:
                    state[step.server] -= set(step.pairs)
                assert set().union(*state) == everything  # no pair ever without a holder
        assert state == [pairs_of(o) for o in target]


def test_a_full_server_gives_away_before_it_loads():
    rounds = schedule([{1: (0, 1)}, {1: (2,)}], [{1: (2,)}, {1: (0, 1)}], [2, 3])
    assert [[(s.kind, s.server, s.pairs) for s in r] for r in rounds] == [
        [("load", 1, ((1, 0), (1, 1))), ("drop", 0, ((1, 0), (1, 1)))],  # server 0 is full: it drops first
        [("load", 0, ((1, 2),)), ("drop", 1, ((1, 2),))],
    ]


def test_schedule_refuses_a_swap_without_room():
    a, b = {1: (0,)}, {1: (1,)}
    with pytest.raises(PlanError, match="no order of loads and drops fits"):
        schedule([a, b], [b, a], [1, 1])


def test_imbalance_splits_an_expert_over_its_replicas():
    grid = ExpertGrid((0,), 2)
    load = {(0, 0): 3.0, (0, 1): 1.0}
    assert imbalance(grid, load, [{0: (0,)}, {0: (1,)}]) == (1.5, 1.5)  # 3 vs 1: busiest 3 over mean 2
    assert imbalance(grid, load, [{0: (0,)}, {0: (0, 1)}]) == (1.25, 1.25)  # 1.5 vs 1.5 + 1: 2.5 over 2
