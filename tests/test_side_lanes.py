"""rpc/side_lanes.py: a split call's pieces run at once, the first on the caller's thread, each outcome its own."""

import threading

import pytest

from moe_serve.rpc import side_lanes


def test_calls_run_at_once_the_first_on_the_callers_thread_and_outcomes_keep_their_order():
    n = 5
    barrier = threading.Barrier(n, timeout=20)  # passes only if all n calls wait in it at the same time

    def call(i: int):
        barrier.wait()
        return i, threading.get_ident()

    outcomes = side_lanes.each([lambda i=i: call(i) for i in range(n)])
    assert [value[0] for value, _ in outcomes] == list(range(n))
    assert all(error is None for _, error in outcomes)
    threads = [value[1] for value, _ in outcomes]
    assert threads[0] == threading.get_ident() and len(set(threads)) == n


def test_each_failure_is_its_own_outcome_and_values_raises_the_first():
    class Stop(BaseException):  # not an Exception: a worker hands it back all the same, and goes on
        pass

    def fail(err):
        raise err

    first, later = ValueError("the first"), Stop()
    outcomes = side_lanes.each([lambda: 1, lambda: fail(first), lambda: 3, lambda: fail(later)])
    assert outcomes == [(1, None), (None, first), (3, None), (None, later)]
    with pytest.raises(ValueError, match="the first"):
        side_lanes.values(outcomes)
    assert side_lanes.values(side_lanes.each([lambda: 1, lambda: 2])) == [1, 2]
    assert side_lanes.each([]) == []


def test_many_callers_at_once_past_the_workers_limit_all_finish(monkeypatch):
    """More tasks at once than workers may run: the rest queue and every caller gets every outcome."""
    monkeypatch.setattr(side_lanes, "_WORKERS", side_lanes._Workers(limit=3))
    callers, per_call = 8, 4
    results: dict[int, list] = {}

    def caller(c: int) -> None:
        for round_ in range(20):
            outcomes = side_lanes.each([lambda i=i, r=round_: (c, r, i) for i in range(per_call)])
            assert side_lanes.values(outcomes) == [(c, round_, i) for i in range(per_call)]
        results[c] = outcomes

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(callers))
    assert side_lanes._WORKERS.threads <= 3
