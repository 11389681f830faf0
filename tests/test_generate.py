"""Causal LMs through real expert servers and a gateway on loopback: logits, Forward and Generate
against transformers (and the DeepSeek reference), sampling, and bad requests."""

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open

from moe_client import GatewayClient
from moe_serve.gateway.batching_config import BatchingConfig
from tests.support.references import (
    check_logprobs,
    random_prompts,
    reference_greedy,
    reference_logits,
    reference_logprobs,
)

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek"]


def start(cluster, path, **gateway_options) -> str:
    """Two expert servers splitting the experts unevenly, and a gateway over them."""
    servers = [cluster.expert_server(path, experts=e) for e in ("0-2", "3-7")]
    return cluster.gateway(path, servers, **gateway_options)


def tensor(path, name: str) -> torch.Tensor:
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open handles are not containers
                return handle.get_tensor(name)
    raise KeyError(name)


@pytest.mark.parametrize("arch", ARCHS)
def test_distributed_matches_reference(cluster, causal_checkpoints, arch):
    path = causal_checkpoints[arch]
    gateway = start(cluster, path)
    engine = cluster.servicers[gateway].engine
    vocab = engine.model.spec.vocab_size

    # Logits for a batch of prompts of different lengths, in one batch through the expert servers.
    prompts = random_prompts(vocab, [4, 11, 1])
    for got, want in zip(engine.prompt_logits(prompts), reference_logits(path, prompts), strict=True):
        assert (got - want).abs().max() <= 1e-4

    # Forward: input embeddings [B, S, H] -> final hidden states; times lm_head^T they are the logits.
    same_len = random_prompts(vocab, [6, 6])
    embeds = tensor(path, "model.embed_tokens.weight")[torch.tensor(same_len)].numpy()
    with GatewayClient(gateway) as client:
        hidden = client.forward(embeds)
        tied = engine.model.spec.tie_word_embeddings
        lm_head = tensor(path, "model.embed_tokens.weight" if tied else "lm_head.weight")
        logits = torch.from_numpy(hidden) @ lm_head.T
        for got, want in zip(logits, reference_logits(path, same_len), strict=True):
            assert (got - want).abs().max() <= 1e-4

        # Greedy Generate streams what the reference generates, token for token.
        prompt = random_prompts(vocab, [5])[0]
        tokens = list(client.generate(prompt, max_new_tokens=8, ignore_eos=True))
    assert [t.token_id for t in tokens] == reference_greedy(path, prompt, 8)
    assert [t.finish_reason for t in tokens] == [None] * 7 + ["length"]
    assert tokens[-1].prompt_tokens == 5 and tokens[-1].generated_tokens == 8
    assert all(t.text is None for t in tokens)  # no tokenizer.json in this checkpoint


def test_sampling_stop_tokens_and_bad_requests(cluster, causal_checkpoints):
    path = causal_checkpoints["qwen3_moe"]
    gateway = start(cluster, path, max_new_tokens=40)
    with GatewayClient(gateway) as client:
        prompt = random_prompts(160, [6])[0]
        greedy = [t.token_id for t in client.generate(prompt, max_new_tokens=10)]

        def sample(**kw):
            return [t.token_id for t in client.generate(prompt, max_new_tokens=10, temperature=1.5, **kw)]

        assert sample(seed=7) == sample(seed=7)
        assert len({tuple(sample(seed=s)) for s in range(4)}) > 1  # different seeds, different draws
        assert sample(top_k=1, seed=3) == greedy and sample(top_p=1e-6, seed=3) == greedy

        # A stop token ends the stream and is its last token.
        stopped = list(client.generate(prompt, max_new_tokens=10, stop_token_ids=[greedy[3]]))
        first = greedy.index(greedy[3])
        assert [t.token_id for t in stopped] == greedy[:first + 1] and stopped[-1].finish_reason == "stop"

        bad = [
            (dict(prompt=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty"),
            (dict(prompt=[3, 160]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids[1]: token id 160"),
            (dict(prompt="hello"), grpc.StatusCode.INVALID_ARGUMENT, "has no tokenizer.json"),
            (dict(prompt=prompt, max_new_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT,
             "max_new_tokens: 1000000 exceeds the gateway's limit of 40"),
            (dict(prompt=[1] * 60, max_new_tokens=40), grpc.StatusCode.INVALID_ARGUMENT,
             "= 100 exceeds the model's max_position_embeddings 96"),
            (dict(prompt=prompt, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature: -1.0"),
            (dict(prompt=prompt, top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p: 2.0"),
            (dict(prompt=prompt, stop_token_ids=[-4]), grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids[0]"),
        ]
        for kwargs, code, text in bad:
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate(**kwargs))
            assert err.value.code() == code and text in err.value.details(), (kwargs, err.value.details())
        # Leaving a stream early cancels it; the gateway is still well.
        for _ in client.generate(prompt, max_new_tokens=40, ignore_eos=True):
            break
        assert [t.token_id for t in client.generate(prompt, max_new_tokens=10)] == greedy


def test_forward_shape_rules_for_causal_models(cluster, causal_checkpoints):
    gateway = start(cluster, causal_checkpoints["mixtral"], max_tokens=64)
    with GatewayClient(gateway) as client:
        for shape, text in (((48,), "must be [S, 48] or [B, S, 48]"),
                            ((1, 97, 48), "sequence length 97 exceeds"),
                            ((2, 40, 48), "80 tokens exceed the gateway's limit of 64")):
            with pytest.raises(grpc.RpcError) as err:
                client.forward(np.random.default_rng().standard_normal(shape, dtype=np.float32))
            assert text in err.value.details()
        info = client.model_info()
    assert info.vocab_size == 160 and info.max_position_embeddings == 96 and not info.has_tokenizer


def test_generate_on_simple_moe_is_refused(cluster, tiny_checkpoint):
    servers = [cluster.expert_server(tiny_checkpoint)]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    with GatewayClient(gateway) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate([1, 2, 3]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "simple_moe" in err.value.details()


def test_bf16_dense_layers_and_experts_stay_close(cluster, causal_checkpoints):
    path = causal_checkpoints["deepseek"]
    servers = [cluster.expert_server(path, experts=e, dtype="bfloat16") for e in ("0-3", "4-7")]
    gateway = cluster.gateway(path, servers, dense_dtype="bfloat16", wire_dtype="bfloat16")
    engine = cluster.servicers[gateway].engine
    prompts = random_prompts(160, [9, 3])
    for got, want in zip(engine.prompt_logits(prompts), reference_logits(path, prompts), strict=True):
        # bf16 keeps ~3 significant digits per op through 5 layers; the logits have a std of about 4.
        assert (got - want).abs().mean() / want.std() < 5e-2
    with GatewayClient(gateway) as client:
        assert len(list(client.generate(prompts[0], max_new_tokens=4, ignore_eos=True))) == 4


@pytest.mark.parametrize("batching", [True, False])
def test_logprobs_equal_log_softmax_of_transformers(cluster, causal_checkpoints, batching):
    """Generate's log-probs (the scheduler's on the device, and the --no-batching engine's) are log_softmax of
    transformers' float32 logits at each step, chosen token and top-k alike."""
    path = causal_checkpoints["qwen3_moe"]
    gateway = start(cluster, path, batching=BatchingConfig(batching=batching))
    prompt = random_prompts(160, [7])[0]
    with GatewayClient(gateway) as client:
        tokens = list(client.generate(prompt, max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=5,
                                      top_logprobs=4))
        plain = list(client.generate(prompt, max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=5))
        chosen_only = list(client.generate(prompt, max_new_tokens=6, ignore_eos=True, logprobs=True))
    ids = [t.token_id for t in tokens]
    assert ids == [t.token_id for t in plain]  # asking for log-probs changes nothing else
    assert all(t.logprob is None and not t.top_logprobs for t in plain)
    check_logprobs(reference_logprobs(path, prompt, ids), ids, [t.logprob for t in tokens],
                   [list(t.top_logprobs) for t in tokens], 4)
    greedy = [t.token_id for t in chosen_only]
    check_logprobs(reference_logprobs(path, prompt, greedy), greedy, [t.logprob for t in chosen_only],
                   [[] for _ in chosen_only], 0)
    with GatewayClient(gateway) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate(prompt, top_logprobs=21))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs: 21" in err.value.details()
