"""The overlap machinery in-process: shared experts run while routed experts are in flight, and two
micro-batches in turns give what one batch gives."""

from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

import moe_serve.core.decoder as decoder
from moe_serve.gateway.overlap import PingPong, split_point
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference


class SlowExperts:
    """A backend whose submit() returns before the experts have run; they run on another thread."""

    def __init__(self, inner, events: list[str]):
        self.inner = inner
        self.events = events
        self.pool = ThreadPoolExecutor(1)

    def run(self, layer, hidden, ids, weights):
        return self.inner.run(layer, hidden, ids, weights)

    def submit(self, layer, hidden, ids, weights) -> Future:
        self.events.append(f"submit {layer}")

        def later():
            self.events.append(f"experts {layer}")
            return self.inner.run(layer, hidden, ids, weights)

        return self.pool.submit(later)


def test_shared_experts_run_while_routed_experts_are_in_flight(causal_checkpoints, monkeypatch):
    path = causal_checkpoints["deepseek"]
    model, experts = load_reference(Checkpoint(path))
    events: list[str] = []
    swiglu = decoder.swiglu

    def shared(x, w):
        events.append("shared")
        return swiglu(x, w)

    monkeypatch.setattr(decoder, "swiglu", shared)
    hidden = torch.randn(9, model.spec.hidden_size)
    with torch.inference_mode():
        want = model.forward_hidden(hidden, [model.new_cache()], [9], experts)
        events.clear()
        got = model.forward_hidden(hidden, [model.new_cache()], [9], SlowExperts(experts, events))
    assert torch.equal(got, want)
    moe = list(model.spec.moe_layers)
    # Each MoE layer: the routed experts are started before the shared experts run, not after.
    for layer in moe:
        start = events.index(f"submit {layer}")
        assert "shared" in events[start:start + 3]


@pytest.mark.parametrize("overlap", [True, False])
def test_two_micro_batches_equal_one_batch(causal_checkpoints, overlap):
    path = causal_checkpoints["qwen2_moe"]
    model, experts = load_reference(Checkpoint(path))
    lengths = [5, 1, 8, 3]
    tokens = [torch.randint(0, model.spec.vocab_size, (n,)) for n in lengths]
    with torch.inference_mode():
        whole = model.forward(tokens, [model.new_cache() for _ in tokens], experts)
    runner = PingPong(SlowExperts(experts, []), overlap=overlap)
    cut = split_point(lengths)

    def part(group):
        return lambda backend: model.forward(group, [model.new_cache() for _ in group], backend)

    try:
        results, waited = runner.run([part(tokens[:cut]), part(tokens[cut:])])
    finally:
        runner.close()
    halves = results[0] + results[1]
    assert waited > 0 and runner.split_runs == (1 if overlap else 0)
    for got, want in zip(halves, whole, strict=True):
        # Two halves run GEMMs of other shapes than one batch: fp32 rounding, relative to logits of ~10.
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_a_failing_micro_batch_fails_the_run_and_the_other_finishes():
    runner = PingPong(None, overlap=True)
    finished = []

    def bad(backend):
        raise ValueError("layer 3: broken")

    def good(backend):
        finished.append(True)
        return 1

    try:
        with pytest.raises(ValueError, match="layer 3"):
            runner.run([good, bad])
        with pytest.raises(ValueError, match="layer 3"):
            runner.run([bad, good])
    finally:
        runner.close()
    assert finished == [True, True]


def test_small_steps_stay_whole():
    runner = PingPong(None, overlap=True, min_split_tokens=64)
    off = PingPong(None, overlap=False)
    try:
        assert runner.cut([1] * 63) == 0 and runner.cut([16, 16, 16, 16]) == 2 and runner.cut([100]) == 0
        assert off.cut([16] * 8) == 0
    finally:
        runner.close()
        off.close()


def test_split_point_balances_tokens():
    assert split_point([]) == 0 and split_point([7]) == 0
    assert split_point([1, 1]) == 1
    assert split_point([1, 1, 1, 1, 1, 1]) == 3
    assert split_point([20, 1, 1, 1]) == 1
    assert split_point([1, 1, 1, 20]) == 3
    assert split_point([3, 5, 2, 6]) == 2
