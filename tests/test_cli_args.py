"""Command-line mistakes a new user makes, with the real console scripts: each is one line naming the bad value,
never a traceback, a silent default or a dial to port 443."""

import subprocess

import pytest

from moe_client.pb import gateway_pb2
from moe_serve.gateway.generate_request import sampling_params
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.errors import InvalidArgument
from tests.support import BIN


def _client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "moe-client"), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,expected", [
    (("generate", "--ids", "1,2", "--max-new-tokens", "0"), "argument --max-new-tokens: 0 must be at least 1"),
    (("generate", "--ids", "1,2", "--max-new-tokens", "-3"), "argument --max-new-tokens: -3 must be at least 1"),
    (("generate", "--ids", "1,2", "--top-k", "-1"), "argument --top-k: -1 must be at least 0"),
    (("--address", "127.0.0.1", "health"), "argument --address: '127.0.0.1' has no port: give host:port, "
                                           "e.g. 127.0.0.1:50050"),
    (("--address", "::1", "health"), "'::1' has no port"),
])
def test_bad_arguments_are_one_line_naming_the_value(args, expected):
    result = _client(*args)
    assert result.returncode == 2, result
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_addresses_with_ports_are_taken():
    for address in ("127.0.0.1:1", "[::1]:1", "localhost:1", "unix:/tmp/none.sock"):
        result = _client("--address", address, "--timeout", "0.5", "health")
        assert "has no port" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_forward_help_lists_every_wire_dtype():
    text = " ".join(_client("forward", "--help").stdout.split())
    assert "float32, bfloat16, float16, float8_e4m3" in text


@pytest.mark.parametrize("field,value", [("temperature", float("inf")), ("temperature", float("nan")),
                                         ("temperature", -1.0), ("top_p", float("inf"))])
def test_sampling_settings_are_worded_as_what_they_must_be(causal_checkpoints, field, value):
    spec = Checkpoint(causal_checkpoints["mixtral"]).spec
    request = gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=2, **{field: value})
    with pytest.raises(InvalidArgument) as err:
        sampling_params(request, spec, 2, 16, 1024)
    want = "must be a finite number >= 0 (0 = greedy)" if field == "temperature" else "must be a number in [0, 1]"
    assert str(err.value) == f"{field}: {value} {want}"
