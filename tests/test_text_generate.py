"""Text prompts and streamed text, for a checkpoint with a tokenizer.json."""

import pytest
import torch

from moe_client import GatewayClient
from moe_serve.model.tokenizer import TextTokenizer
from tests.support.checkpoints import build_tokenizer, write_text_checkpoint


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("text") / "qwen3-text", int(torch.randint(0, 2**31, ())))


def test_text_prompt_streams_text(cluster, text_checkpoint):
    servers = [cluster.expert_server(text_checkpoint, experts=e) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(text_checkpoint, servers)
    tokenizer = build_tokenizer()
    prompt = "The cat sat on"
    ids = tokenizer.encode(prompt).ids
    with GatewayClient(gateway) as client:
        assert client.model_info().has_tokenizer
        by_text = list(client.generate(prompt, max_new_tokens=24, ignore_eos=True))
        by_ids = list(client.generate(ids, max_new_tokens=24, ignore_eos=True))
    assert [t.token_id for t in by_text] == [t.token_id for t in by_ids]
    assert by_text[-1].prompt_tokens == len(ids)
    generated = [t.token_id for t in by_text]
    pieces = "".join(t.text for t in by_text)
    full = tokenizer.decode(ids + generated)
    assert full.startswith(tokenizer.decode(ids))
    # The pieces add up to the decoded text: the last token's piece carries what was still held back.
    assert pieces == full[len(tokenizer.decode(ids)):]


def test_stream_waits_for_whole_characters():
    tokenizer = build_tokenizer()
    text = TextTokenizer(tokenizer, None)
    prompt = tokenizer.encode("words: ").ids
    # "日" is three UTF-8 bytes; fed as single byte tokens, the first two yield nothing.
    byte_ids = [tokenizer.token_to_id(ch) for ch in tokenizer.pre_tokenizer.pre_tokenize_str("日")[0][0]]
    stream = text.stream(prompt)
    pieces = [stream.push(t) for t in byte_ids]
    assert pieces == ["", "", "日"]
    assert stream.push(tokenizer.token_to_id("a")) == "a"


def test_the_last_token_flushes_what_is_held_back():
    """A generation that ends inside a character, or on a complete one after such bytes (which a
    stream must hold while they may still complete), still returns all of its text."""
    tokenizer = build_tokenizer()
    text = TextTokenizer(tokenizer, None)
    prompt = tokenizer.encode("words: ").ids
    first, second, _ = (tokenizer.token_to_id(ch) for ch in tokenizer.pre_tokenizer.pre_tokenize_str("日")[0][0])
    a = tokenizer.token_to_id("a")
    for generated in ([first], [first, second], [a, first], [first, a, second]):
        stream = text.stream(prompt)
        pieces = [stream.push(t, last=i == len(generated) - 1) for i, t in enumerate(generated)]
        full = tokenizer.decode(prompt + generated)
        assert "".join(pieces) == full[len(tokenizer.decode(prompt)):] and "\ufffd" in pieces[-1], generated
