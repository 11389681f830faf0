"""Dynamic Forward batching and continuous-batched Generate through real servers on loopback: under
concurrent load every request gets what it would get alone (and what the references give)."""

import argparse
import threading
import time

import numpy as np
import pytest
import torch

from moe_client import GatewayClient
from moe_serve.gateway.batching_config import (
    BatchingConfig,
    add_batching_flags,
    batching_config_from_args,
    uses_decode_graphs,
)
from tests.support.references import random_prompts, reference_forward, reference_greedy
from tests.support.threads import concurrently


def start(cluster, path, **batching) -> str:
    """Two expert servers splitting the experts unevenly, and a gateway over them with these batching settings
    (steps of any size split into two micro-batches, so the tiny test batches take the ping-pong path)."""
    servers = [cluster.expert_server(path, experts=e) for e in ("0-2", "3-7")]
    return cluster.gateway(path, servers, batching=BatchingConfig(**{"overlap_min_tokens": 1, **batching}))


def test_batched_forward_equals_each_request_alone(cluster, tiny_checkpoint):
    rng = np.random.default_rng()
    shapes = [(1, 64), (7, 64), (2, 5, 64), (33, 64), (3, 1, 64), (16, 64), (4, 64), (1, 1, 64)]
    inputs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    total = sum(x.size // 64 for x in inputs)
    # Exactly one batch: the budget is the total, and the delay is long enough that only a full budget starts it.
    one_batch = start(cluster, tiny_checkpoint, max_batch_tokens=total, max_queue_delay_ms=60_000)
    # Small batches: a budget below most requests, so big ones run alone and small ones share.
    servers = [s.address for s in cluster.servicers[one_batch].info.servers]
    small = cluster.gateway(tiny_checkpoint, servers, batching=BatchingConfig(max_batch_tokens=8, max_queue_delay_ms=5,
                                                                              overlap_min_tokens=1))
    for gateway in (one_batch, small):
        with GatewayClient(gateway) as client:
            outs = concurrently(client.forward, inputs)
        for x, got in zip(inputs, outs, strict=True):
            assert got.shape == x.shape
            assert np.abs(got - reference_forward(tiny_checkpoint, x)).max() <= 1e-5
    assert cluster.servicers[one_batch].batcher.batches == 1
    assert cluster.servicers[small].batcher.batches >= 4  # 76 tokens, at most 8 (or one request) per batch


def test_batched_causal_forward_keeps_sequences_apart(cluster, causal_checkpoints):
    path = causal_checkpoints["qwen2_moe"]
    rng = np.random.default_rng()
    shapes = [(2, 6, 48), (9, 48), (1, 3, 48), (4, 48), (3, 1, 48)]
    inputs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    total = sum(x.size // 48 for x in inputs)
    gateway = start(cluster, path, max_batch_tokens=total, max_queue_delay_ms=60_000)
    engine = cluster.servicers[gateway].engine
    with GatewayClient(gateway) as client:
        outs = concurrently(client.forward, inputs)
    assert cluster.servicers[gateway].batcher.batches == 1
    for x, got in zip(inputs, outs, strict=True):
        alone, _ = engine.forward(torch.from_numpy(x))  # unbatched, the same expert servers
        assert (torch.from_numpy(got) - alone).abs().max() <= 1e-5


@pytest.mark.parametrize(("arch", "decode_graphs"),
                         [("qwen2_moe", False), ("deepseek", False), ("olmoe", False), ("qwen2_moe", True)])
def test_continuous_batching_greedy_matches_one_at_a_time(cluster, causal_checkpoints, arch, decode_graphs):
    """decode_graphs: decode-only steps through core.decode_step (eager stages here, without a GPU)."""
    path = causal_checkpoints[arch]
    # Room for 5 sequences and 8 prompt tokens a step: requests queue for a slot, long prompts prefill in chunks
    # beside other sequences' decode tokens.
    gateway = start(cluster, path, max_prefill_tokens=8, max_running_requests=5, decode_graphs=decode_graphs)
    lengths = [1, 3, 12, 5, 20, 2, 9, 17, 4, 7]
    new_tokens = [12, 3, 6, 25, 4, 1, 9, 14, 7, 18]
    prompts = random_prompts(160, lengths)
    leave_after = {3: 5, 7: 2}  # these clients stop reading (cancel) after so many tokens
    second_wave = threading.Event()  # requests 5.. join while the first ones are mid-way
    streams: dict[int, list] = {}

    with GatewayClient(gateway) as client:
        def run(i: int) -> None:
            if i >= 5:
                second_wave.wait(60)
            got = []
            try:
                for token in client.generate(prompts[i], max_new_tokens=new_tokens[i], ignore_eos=True):
                    got.append(token)
                    if i == 3 and len(got) == 4:
                        second_wave.set()
                    if len(got) == leave_after.get(i):
                        break
            finally:
                if i == 3:  # never leave the second wave waiting
                    second_wave.set()
                streams[i] = got

        concurrently(run, list(range(len(prompts))))
        alone = {i: [t.token_id for t in client.generate(prompts[i], max_new_tokens=new_tokens[i], ignore_eos=True)]
                 for i in range(len(prompts))}

    for i, prompt in enumerate(prompts):
        ids = [t.token_id for t in streams[i]]
        want = reference_greedy(path, prompt, new_tokens[i])
        assert alone[i] == want, i
        if i in leave_after:
            assert ids == want[:leave_after[i]], i
            continue
        assert ids == want, i
        assert [t.finish_reason for t in streams[i]] == [None] * (new_tokens[i] - 1) + ["length"]
        assert streams[i][-1].generated_tokens == new_tokens[i] and streams[i][-1].prompt_tokens == len(prompt)
    scheduler = cluster.servicers[gateway].scheduler
    assert (scheduler.staged_parts > 0) == decode_graphs
    deadline = time.monotonic() + 30
    while scheduler.active and time.monotonic() < deadline:  # the cancelled ones leave at the next step
        time.sleep(0.01)
    assert scheduler.active == 0


def test_seeded_sampling_does_not_depend_on_the_batch(cluster, causal_checkpoints):
    path = causal_checkpoints["mixtral"]
    gateway = start(cluster, path)
    prompt = random_prompts(160, [6])[0]
    others = random_prompts(160, [3, 9, 1, 14, 5, 2])
    with GatewayClient(gateway) as client:
        def sampled(seed: int) -> list[int]:
            return [t.token_id for t in client.generate(prompt, max_new_tokens=12, temperature=1.3, top_k=40,
                                                        top_p=0.95, seed=seed, ignore_eos=True)]

        alone = sampled(11)

        def job(i: int):
            if i < len(others):  # greedy and sampled neighbours of other lengths
                return list(client.generate(others[i], max_new_tokens=8 + i, temperature=0.8 * (i % 2), seed=i,
                                            ignore_eos=True))
            return sampled(11)

        together = concurrently(job, list(range(len(others) + 2)))
        assert len({tuple(sampled(s)) for s in range(3)}) > 1  # the seed matters
    assert together[-1] == alone and together[-2] == alone


def test_overlap_on_and_off_give_the_same_results(cluster, causal_checkpoints):
    path = causal_checkpoints["deepseek"]  # shared experts run while the routed ones are in flight
    servers = [cluster.expert_server(path, experts=e) for e in ("0-4", "5-7")]
    prompts = random_prompts(160, [4, 11, 1, 7, 16, 2, 9, 5])
    rng = np.random.default_rng()
    hidden = [rng.standard_normal(s, dtype=np.float32) for s in [(2, 5, 48), (7, 48), (1, 1, 48), (3, 4, 48)]]
    results = {}
    for overlap in (True, False):
        gateway = cluster.gateway(path, servers, batching=BatchingConfig(
            overlap=overlap, overlap_min_tokens=1, max_prefill_tokens=16,
            max_batch_tokens=sum(h.size // 48 for h in hidden), max_queue_delay_ms=60_000))
        with GatewayClient(gateway) as client:
            tokens = concurrently(lambda p, c=client: [t.token_id for t in c.generate(p, max_new_tokens=10,
                                                                                        ignore_eos=True)], prompts)
            outs = concurrently(client.forward, hidden)
        servicer = cluster.servicers[gateway]
        assert servicer.batcher.pingpong.split_runs == (1 if overlap else 0)  # the one Forward batch, in two halves
        results[overlap] = tokens, outs
    assert results[True][0] == results[False][0]
    assert results[True][0] == [reference_greedy(path, p, 10) for p in prompts]
    for on, off in zip(results[True][1], results[False][1], strict=True):
        assert np.abs(on - off).max() <= 1e-5


def test_decode_graphs_default_on_for_gpu_dense_layers_only(monkeypatch):
    """Unset, --decode-graphs follows where the dense layers run (on with a GPU, measured in docs/gpu.md);
    the flag and MOE_DECODE_GRAPHS set it either way."""
    def parsed(*argv):
        p = argparse.ArgumentParser()
        add_batching_flags(p)
        return batching_config_from_args(p.parse_args(list(argv)))

    monkeypatch.delenv("MOE_DECODE_GRAPHS", raising=False)
    unset = parsed()
    assert unset.decode_graphs is None
    assert uses_decode_graphs(unset, torch.device("cuda", 0)) and not uses_decode_graphs(unset, torch.device("cpu"))
    for config in (parsed("--decode-graphs"), parsed("--no-decode-graphs")):
        assert all(uses_decode_graphs(config, torch.device(d)) == config.decode_graphs for d in ("cpu", "cuda"))
    monkeypatch.setenv("MOE_DECODE_GRAPHS", "0")
    assert not uses_decode_graphs(parsed(), torch.device("cuda", 0))
    monkeypatch.setenv("MOE_DECODE_GRAPHS", "1")
    assert uses_decode_graphs(parsed(), torch.device("cpu"))
