"""Every boolean flag reads its MOE_* variable the same way (1/true/yes/on, any case), flags override it."""

import pytest

from moe_serve.expert_server.config import build_parser as expert_parser
from moe_serve.gateway.config import build_parser as gateway_parser
from moe_serve.process.env import env_flag


@pytest.mark.parametrize(("value", "want"), [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                             ("0", False), ("false", False), ("off", False), ("", False)])
def test_env_flag_values(monkeypatch, value, want):
    monkeypatch.setenv("MOE_SOME_FLAG", value)
    assert env_flag("SOME_FLAG", default=not want) is want


def test_env_flag_unset_is_the_default(monkeypatch):
    monkeypatch.delenv("MOE_SOME_FLAG", raising=False)
    assert env_flag("SOME_FLAG", True) is True and env_flag("SOME_FLAG", False) is False


@pytest.mark.parametrize(("parser", "variable", "dest", "flag"), [
    (gateway_parser, "SHARED_MEMORY", "shared_memory", "--shared-memory"),
    (gateway_parser, "OVERLAP", "overlap", "--overlap"),
    (gateway_parser, "ROUTED_CALLS", "routed_calls", "--routed-calls"),
    (gateway_parser, "PIPELINED_CALLS", "pipelined_calls", "--pipelined-calls"),
    (expert_parser, "MERGE_CALLS", "merge_calls", "--merge-calls"),
    (expert_parser, "REQUIRE_CLIENT_CERT", "require_client_cert", "--require-client-cert"),
])
def test_services_take_boolean_defaults_from_the_environment(monkeypatch, parser, variable, dest, flag):
    monkeypatch.setenv("MOE_CHECKPOINT", "/nowhere")
    monkeypatch.setenv(f"MOE_{variable}", "off")
    assert getattr(parser().parse_args([]), dest) is False
    assert getattr(parser().parse_args([flag]), dest) is True  # the flag overrides the variable
    monkeypatch.setenv(f"MOE_{variable}", "ON")
    assert getattr(parser().parse_args([]), dest) is True
