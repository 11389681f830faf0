"""A real Prometheus scrapes a gateway and three expert servers with the project's own scrape config; its
HTTP API then returns exactly the requests, tokens and bytes we sent, the serving metrics of the Generate
streams we ran, and every Grafana panel has data. The model is the embedded causal LM (create-model
--causal-lm: hidden 64, 2 MoE layers of 8 experts, top-2), so Forward and Generate both run."""

import json
import os
import re
import subprocess

import grpc
import numpy as np
import pytest

from moe_client import GatewayClient
from moe_serve.expert_server.config import ExpertServerConfig
from moe_serve.expert_server.main import create_server
from moe_serve.gateway.config import GatewayConfig
from moe_serve.gateway.main import create_gateway
from moe_serve.model.synthetic_lm import SyntheticLMConfig, write_causal_lm
from tests.support import ROOT
from tests.support.prometheus import Prometheus, render_config, require

EXPERTS = ("0-2", "3-5", "6-7")  # of the tiny checkpoint's 8
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "moe-serve.json"


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    return write_causal_lm(tmp_path_factory.mktemp("lm"), SyntheticLMConfig(seed=seed))


@pytest.fixture
def services(loop_thread, lm_checkpoint):
    """Three expert servers and a gateway on loopback, each with /metrics on its own port."""
    started = []  # (handle, servicer)
    for i, experts in enumerate(EXPERTS):
        config = ExpertServerConfig(checkpoint=str(lm_checkpoint), experts=experts, host="127.0.0.1", port=0,
                                    name=f"expert-{i}")
        started.append(loop_thread.run(create_server(config)))
    servers = [f"127.0.0.1:{handle.port}" for handle, _ in started]
    config = GatewayConfig(checkpoint=str(lm_checkpoint), servers=servers, host="127.0.0.1", port=0,
                           connect_timeout=20.0)
    started.append(loop_thread.run(create_gateway(config)))
    metrics = [f"127.0.0.1:{servicer.metrics.serve('127.0.0.1', 0)}" for _, servicer in started]
    yield {"gateway": f"127.0.0.1:{started[-1][0].port}", "gateway_metrics": metrics[-1],
           "expert_metrics": metrics[:-1], "handles": [h for h, _ in started]}
    for handle, servicer in reversed(started):
        loop_thread.run(handle.stop(0))
        servicer.metrics.close()


@pytest.fixture
def prometheus(services, tmp_path):
    require("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config([services["gateway_metrics"]], services["expert_metrics"], "1s"))
    promtool = subprocess.run([require("promtool"), "check", "config", str(config)], capture_output=True, text=True)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    server = Prometheus(config, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def dashboard_variables(prometheus) -> dict[str, str]:
    """Each template variable as Grafana sets it with "All" chosen: its label_values() query asked of this
    Prometheus (earlier variables filled in), then the values as a regex, or the variable's allValue."""
    found: dict[str, str] = {}
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        match, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"]).groups()
        for name, value in found.items():
            match = match.replace(f"${name}", value)
        values = prometheus.label_values(label, match)
        found[var["name"]] = var.get("allValue") or "(" + "|".join(values) + ")"  # job names: no regex metacharacters
    return found


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel, with $__rate_interval and the variables made concrete."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m")
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace(f"${name}", variables[name])
            queries.append((p["title"], expr))
    return queries


def test_prometheus_sees_what_we_sent(services, prometheus, loop_thread):
    # Every target scraped once before traffic, so rates see the requests as increases.
    prometheus.wait_for('count(up{job=~"moe-.*"} == 1)', lambda v: v.get("") == 4)
    rng = np.random.default_rng()
    batches = [(2, 5), (1, 7), (3, 4)]
    with GatewayClient(services["gateway"]) as client:
        for batch in batches:
            client.forward(rng.standard_normal((*batch, 64), dtype=np.float32))
        with pytest.raises(grpc.RpcError) as bad:
            client.forward(rng.standard_normal((3, 65), dtype=np.float32))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tokens = sum(b * s for b, s in batches)

    p = prometheus
    p.wait_for('sum(moe_requests_total{job="moe-gateway", rpc="Forward"})', lambda v: v.get("") == 4)
    assert p.values('moe_requests_total{job="moe-gateway", rpc="Forward"}', by="code") == {
        "OK": 3, "INVALID_ARGUMENT": 1}
    assert p.values('moe_tokens_total{job="moe-gateway", rpc="Forward"}') == {"": tokens}
    assert p.values('moe_batch_tokens_count{job="moe-gateway", rpc="Forward"}') == {"": 3}
    assert p.values('moe_request_duration_seconds_count{job="moe-gateway", rpc="Forward"}') == {"": 4}

    # Expert servers: every token goes to top-2 experts in each of the 2 MoE layers; each server reports
    # a series for each expert it owns (zero or not).
    p.wait_for('sum(moe_expert_tokens_total)', lambda v: v.get("") == 2 * 2 * tokens)
    assert p.values('sum by (layer) (moe_expert_tokens_total)', by="layer") == {"0": 2 * tokens, "1": 2 * tokens}
    per_server = p.values('count by (instance) (moe_expert_tokens_total)', by="instance")
    assert per_server == dict(zip(services["expert_metrics"], (6, 6, 4), strict=True))
    assert p.values('sum(moe_expert_tokens_total) by (instance) > 0', by="instance").keys() == per_server.keys()

    # The gateway's view of its RunExperts calls matches the servers' view, to the byte.
    calls = p.values('sum(moe_expert_calls_total{job="moe-gateway", code="OK"})')[""]
    served = p.values('sum(moe_requests_total{job="moe-expert-server", rpc="RunExperts", code="OK"})')[""]
    assert calls == served > 0
    assert p.values('sum(moe_expert_compute_seconds_count)')[""] == served
    assert p.values('sum(moe_queue_wait_seconds_count{job="moe-expert-server"})')[""] == served
    assert (p.values('sum(moe_expert_call_sent_bytes_total)')[""]
            == p.values('sum(moe_received_bytes_total{rpc="RunExperts"})')[""] > 0)
    assert (p.values('sum(moe_expert_call_received_bytes_total)')[""]
            == p.values('sum(moe_sent_bytes_total{rpc="RunExperts"})')[""] > 0)
    assert set(p.values('sum by (server) (moe_expert_calls_total)', by="server")) == {"expert-0", "expert-1",
                                                                                      "expert-2"}
    assert p.values('sum(moe_requests_in_flight)') == {"": 0}
    assert len(p.values('moe_device_memory_bytes{device="cpu", kind="rss"} > 0', by="instance")) == 4
    assert p.values('sum(moe_weight_bytes)')[""] > 0
    assert p.values('rate(moe_requests_total{job="moe-gateway", rpc="Forward", code="OK"}[1m])')[""] > 0

    # Generate streams: the serving metrics count exactly what ran.
    prompts = [rng.integers(0, 400, n).tolist() for n in (3, 9, 5)]
    new_tokens = [4, 1, 6]
    with GatewayClient(services["gateway"]) as client:
        for prompt, n in zip(prompts, new_tokens, strict=True):
            assert len(list(client.generate(prompt, max_new_tokens=n, ignore_eos=True))) == n
    g = '{job="moe-gateway"}'
    p.wait_for(f'sum(moe_e2e_request_latency_seconds_count{g})', lambda v: v.get("") == 3)
    assert p.values(f'moe_request_success_total{g}', by="finish_reason") == {"length": 3, "stop": 0}
    assert p.values(f'moe_prompt_tokens_total{g}') == {"": sum(map(len, prompts))}
    assert p.values(f'moe_generation_tokens_total{g}') == {"": sum(new_tokens)}
    for name in ("time_to_first_token", "request_queue_time", "request_prefill_time", "request_decode_time"):
        assert p.values(f'moe_{name}_seconds_count{g}') == {"": 3}, name
    assert p.values(f'moe_inter_token_latency_seconds_count{g}') == {"": sum(new_tokens) - 3}
    assert p.values(f'moe_num_requests_running{g} + moe_num_requests_waiting{g} + moe_kv_cache_tokens{g}') == {
        "": 0}

    # An expert server goes away (its /metrics stays, as a hung process's would): the gateway's calls to it
    # fail, and the error panels show it.
    loop_thread.run(services["handles"][2].stop(0))
    with GatewayClient(services["gateway"]) as client, pytest.raises(grpc.RpcError) as down:
        client.forward(rng.standard_normal((64, 64), dtype=np.float32))
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    p.wait_for('sum(moe_requests_total{job="moe-gateway", code="UNAVAILABLE"})', lambda v: v.get("") == 1)

    # A counter born with its first failure needs a second sample before rate() has a value.
    p.wait_for('count_over_time(moe_requests_total{code!="OK"}[1m])', lambda v: v.get("", 0) >= 2)
    # The gateway's pool watches health and skips a server that has stopped, so whether a RunExperts call
    # to it failed first is a race; the expert-call error panel is held to data only when one did.
    call_failed = bool(p.query('moe_expert_calls_total{code!="OK"}'))
    if call_failed:
        p.wait_for('count_over_time(moe_expert_calls_total{code!="OK"}[1m])', lambda v: v.get("", 0) >= 2)
    variables = dashboard_variables(p)
    assert variables["gateway_job"] == "(moe-gateway)" and variables["expert_job"] == "(moe-expert-server)"
    empty = [(title, expr) for title, expr in dashboard_queries(variables) if not p.query(expr)
             and (call_failed or "moe_expert_calls_total{" not in expr or 'code!="OK"' not in expr)]
    assert not empty, f"dashboard panels without data: {empty}"

