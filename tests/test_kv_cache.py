"""The KV pool (slots, reuse, growth), batched decode attention over slots, and the decode step (eager and
through the graph bookkeeping) against transformers and the DeepSeek reference, token by token."""

import pytest
import torch

from moe_serve.core.decode_attention import attend_slots
from moe_serve.core.decode_step import DecodeStep, bucket
from moe_serve.core.kv_batch import attend_causal
from moe_serve.core.kv_cache import KVPool
from moe_serve.core.step_graphs import GraphRecorder
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference
from tests.support.references import reference_logits

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek"]


def test_pool_hands_out_the_lowest_free_slot_and_grows_keeping_contents():
    pool = KVPool(num_layers=2, num_kv_heads=3, head_dim=4, dtype=torch.float32, slots=2, capacity=5)
    a, b = pool.allocate(), pool.allocate()
    assert (a.slot, b.slot, pool.scratch, pool.version) == (0, 1, 2, 0)
    stored = torch.randn(2, 2, 5, 3, 4)
    pool.keys[:, :2] = stored
    pool.values[:, :2] = -stored
    a.advance(5)
    b.advance(3)
    c = pool.allocate()  # none free: the slots double
    assert (c.slot, pool.slots, pool.scratch, pool.version) == (2, 4, 4, 1)
    a.reserve(2)  # 7 > 5 tokens: the capacity doubles
    assert pool.capacity == 10 and pool.version == 2
    assert torch.equal(pool.keys[:, :2, :5], stored) and torch.equal(pool.values[:, :2, :5], -stored)
    assert (a.length, b.length, c.length) == (5, 3, 0)
    b.release()
    with pytest.raises(ValueError, match="slot 1 is not in use"):
        b.release()
    d = pool.allocate()  # the freed slot comes back first, empty
    assert d.slot == 1 and d.length == 0 and pool.in_use == 3


def test_decode_attention_over_slots_equals_one_sequence_at_a_time():
    heads, groups, dim = 6, 2, 8
    pool = KVPool(num_layers=1, num_kv_heads=groups, head_dim=dim, dtype=torch.float32, slots=7, capacity=40)
    pool.keys.normal_()
    pool.values.normal_()
    lengths = [int(n) for n in torch.randint(1, 33, (5,))]
    slots = torch.randperm(7)[:5]  # any slots, in any order
    q = torch.randn(5, heads, dim)
    span = bucket(max(lengths), 16)
    got = attend_slots(q, pool.keys[0], pool.values[0], slots, torch.tensor(lengths), span)
    for row, (slot, n) in enumerate(zip(slots.tolist(), lengths, strict=True)):
        want = attend_causal(q[row:row + 1], pool.keys[0, slot, :n], pool.values[0, slot, :n], n - 1, groups)[0]
        assert (got[row] - want).abs().max() <= 1e-5, (lengths, row)  # fp32 sums over up to 32 keys


class Capturable:
    """An in-process backend flagged capturable: the decode step then records its calls in the one graph."""

    capturable = True

    def __init__(self, inner):
        self.inner = inner
        self.rows = []

    def run(self, layer, hidden, expert_ids, weights):
        self.rows.append(hidden.shape[0])
        return self.inner.run(layer, hidden, expert_ids, weights)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", ["forward", "eager", "graphs", "whole"])
def test_decode_steps_match_reference_with_joins_leaves_and_growth(causal_checkpoints, arch, how):
    """Sequences of many lengths share a small pool: they join mid-stream (a mixed prefill + decode step),
    leave (their slot reused), outgrow the pool's capacity and slots, and cross batch buckets (3 -> 5) and
    attention spans (16 -> 32). Every logit equals the reference over the whole sequence so far."""
    path = causal_checkpoints[arch]
    model, experts = load_reference(Checkpoint(path))
    vocab = model.spec.vocab_size
    pool = model.new_pool(slots=2, capacity=8)
    backend = Capturable(experts) if how == "whole" else experts
    step = None if how == "forward" else DecodeStep(model, pool, graphs=how != "eager", recorder=GraphRecorder())
    seqs = []  # [cache, tokens so far, {position: logits}]

    def join(lengths, decoding):
        """New prompts, prefilled in one step beside the next token of each sequence in `decoding`."""
        new = [[int(t) for t in torch.randint(0, vocab, (n,))] for n in lengths]
        fed = [int(t) for t in torch.randint(0, vocab, (len(decoding),))]
        caches = [s[0] for s in decoding] + [pool.allocate() for _ in new]
        with torch.inference_mode():
            logits = model.forward([torch.tensor([t]) for t in fed] + [torch.tensor(p) for p in new], caches,
                                   experts, last_only=True)
        for s, t, row in zip(decoding, fed, logits[:len(decoding)], strict=True):
            s[1].append(t)
            s[2][len(s[1]) - 1] = row
        for cache, p, row in zip(caches[len(decoding):], new, logits[len(decoding):], strict=True):
            seqs.append([cache, p, {len(p) - 1: row}])

    def decode(live):
        fed = torch.randint(0, vocab, (len(live),))
        caches = [s[0] for s in live]
        with torch.inference_mode():
            if step is None:
                rows = model.forward([t[None] for t in fed], caches, backend, last_only=True)
            else:
                rows = model.logits(step.run(fed, caches, backend)).unbind(0)
        for s, t, row in zip(live, fed.tolist(), rows, strict=True):
            s[1].append(t)
            s[2][len(s[1]) - 1] = row

    join([int(n) for n in torch.randint(1, 12, (3,))], [])
    for _ in range(4):
        decode(seqs)
    seqs[1][0].release()  # the second sequence ends; a newcomer takes its slot
    left = seqs.pop(1)
    join([int(torch.randint(2, 9, ()))], seqs)
    assert seqs[-1][0].slot == left[0].slot
    join([1, int(torch.randint(2, 7, ()))], seqs)  # a one-token prompt too: 5 sequences now
    for _ in range(12):  # the first sequences pass 16 tokens
        decode(seqs)
    assert max(s[0].length for s in seqs) > 16 and pool.slots >= 5 and pool.version > 0
    if step is not None and how != "eager":
        assert 2 <= step.graphs.captures < 16  # buckets 4 and 8 at least, then replays
        captures = step.graphs.captures
        spare = [pool.allocate() for _ in range(pool.slots - pool.in_use + 1)]  # the pool grows: its tensors move
        decode(seqs)
        assert step.graphs.captures == captures + 1  # graphs of the old tensors are dropped and recaptured
        for cache in spare:
            cache.release()
    if how == "whole":
        assert set(backend.rows) == {4, 8}  # the captured calls run every row of the bucket (padding routes nowhere)

    for s in [*seqs, left]:
        want = reference_logits(path, [s[1]])[0]
        for position, got in s[2].items():
            assert (got - want[position]).abs().max() <= 1e-4, (arch, how, position)


class FailingRecorder(GraphRecorder):
    """Capture fails, as it does when something on the stream cannot be captured."""

    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_leaves_the_step_eager_and_right(causal_checkpoints):
    path = causal_checkpoints["qwen2_moe"]
    model, experts = load_reference(Checkpoint(path))
    pool = model.new_pool(slots=3, capacity=32)
    caches = [pool.allocate() for _ in range(3)]
    prompts = [[int(t) for t in torch.randint(0, 160, (n,))] for n in (5, 1, 9)]
    step = DecodeStep(model, pool, graphs=True, recorder=FailingRecorder())
    with torch.inference_mode():
        model.forward([torch.tensor(p) for p in prompts], caches, experts, last_only=True)
        with pytest.raises(ValueError, match="all of which must be in this step's pool"):
            step.run(torch.tensor([1, 2, 3]), [*caches[:2], model.new_cache()], experts)
        for _ in range(3):
            fed = torch.randint(0, 160, (3,))
            got = model.logits(step.run(fed, caches, experts))
            for p, t in zip(prompts, fed.tolist(), strict=True):
                p.append(t)
    assert step.graphs.captures == 0 and len(step.graphs.failures) == 1
    assert "not permitted" in step.graphs.failures[0]
    for row, p in zip(got, prompts, strict=True):
        assert (row - reference_logits(path, [p])[0][-1]).abs().max() <= 1e-4
