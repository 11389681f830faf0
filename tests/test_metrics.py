"""Metrics per service instance, request ids across the gateway and expert servers, and the CLI's
metrics endpoint, placement by ordinal and --help."""

import io
import json
import logging
import re
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from moe_client import ExpertClient, GatewayClient, wire
from moe_client.pb import gateway_pb2, gateway_pb2_grpc
from moe_serve.core.experts import ExpertWeights
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.config import ExpertServerConfig
from moe_serve.expert_server.config import build_parser as expert_parser
from moe_serve.expert_server.main import create_server
from moe_serve.gateway.config import GatewayConfig
from moe_serve.gateway.config import build_parser as gateway_parser
from moe_serve.gateway.main import create_gateway
from moe_serve.model.placement import PlacementError, ServerEntry, pick_entry
from moe_serve.observability.metrics import ServiceMetrics
from moe_serve.process.console import LoadProgress
from moe_serve.rpc.request_ids import RequestIdFilter
from tests.support.launch import launch
from tests.support.ports import free_port
from tests.support.waiting import wait_for


@pytest.fixture
def two_servers_and_gateway(loop_thread, tiny_checkpoint):
    """Expert servers w0 (experts 0-3) and w1 (4-7), a gateway; yields (addresses, registries), gateway last."""
    started = [loop_thread.run(create_server(ExpertServerConfig(
        checkpoint=str(tiny_checkpoint), experts=experts, host="127.0.0.1", port=0, name=f"w{i}")))
        for i, experts in enumerate(("0-3", "4-7"))]
    started.append(loop_thread.run(create_gateway(GatewayConfig(
        checkpoint=str(tiny_checkpoint), servers=[f"127.0.0.1:{h.port}" for h, _ in started], host="127.0.0.1",
        port=0, connect_timeout=20.0))))
    yield [f"127.0.0.1:{h.port}" for h, _ in started], [s.metrics.registry for _, s in started]
    for handle, _ in reversed(started):
        loop_thread.run(handle.stop(0))


class Records(logging.Handler):
    """Keeps (logger, request id, message) of each record, with the services' request-id filter."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.seen: list[tuple[str, str, str]] = []

    def emit(self, record):
        self.seen.append((record.name, record.request_id, record.getMessage()))


@pytest.fixture
def access_log():
    records = Records()
    logger = logging.getLogger("moe_serve.observability.metrics")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)
    logger.setLevel(old)


def test_request_id_reaches_the_expert_servers(two_servers_and_gateway, access_log):
    (*_, gateway), _ = two_servers_and_gateway
    hidden = np.random.default_rng().standard_normal((6, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        client.forward_raw(hidden, request_id="req-abc-123")
    with grpc.insecure_channel(gateway) as channel:  # a caller that sends no id: the gateway makes one
        gateway_pb2_grpc.GatewayServiceStub(channel).Forward(gateway_pb2.ForwardRequest(hidden=wire.encode(hidden)),
                                                             timeout=60)
    forwards = [rid for _, rid, msg in access_log.seen if msg.startswith("Forward OK")]
    run_experts = [rid for _, rid, msg in access_log.seen if msg.startswith("RunExperts OK")]
    assert forwards[0] == "req-abc-123" and re.fullmatch(r"[0-9a-f]{16}", forwards[1])
    # 2 MoE layers; the 6 tokens' top-2 experts reach one or both servers in each layer.
    assert set(run_experts) == set(forwards) and len(run_experts) >= 4


def test_each_server_counts_its_own_calls_and_status_codes(two_servers_and_gateway):
    (w0_address, _, gateway), (w0, w1, gw) = two_servers_and_gateway
    hidden = np.random.default_rng().standard_normal((5, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        client.forward(hidden)
    assert gw.get_sample_value("moe_requests_total", {"rpc": "Forward", "code": "OK"}) == 1
    assert gw.get_sample_value("moe_tokens_total", {"rpc": "Forward"}) == 5
    assert w0.get_sample_value("moe_requests_total", {"rpc": "Forward", "code": "OK"}) is None
    served = [r.get_sample_value("moe_requests_total", {"rpc": "RunExperts", "code": "OK"}) for r in (w0, w1)]
    calls = [gw.get_sample_value("moe_expert_calls_total", {"server": f"w{i}", "code": "OK"}) or 0 for i in (0, 1)]
    assert served == calls and sum(calls) >= 2
    routed = sum(r.get_sample_value("moe_expert_tokens_total", {"layer": str(layer), "expert": str(e)})
                 for r, experts in ((w0, range(4)), (w1, range(4, 8))) for layer in (0, 1) for e in experts)
    assert routed == 5 * 2 * 2  # tokens x top-2 x MoE layers
    sent = gw.get_sample_value("moe_expert_call_sent_bytes_total", {"server": "w0"})
    assert w0.get_sample_value("moe_received_bytes_total", {"rpc": "RunExperts"}) == sent > 0

    # A call naming an expert the server does not hold: counted under its status code.
    with ExpertClient(w0_address) as direct, pytest.raises(grpc.RpcError) as err:
        direct.run_experts(0, hidden[:1], np.array([[5, -1]]), np.ones((1, 2), np.float32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # abort() sends the status before the interceptor sees the error, so the count may land a moment later.
    not_found = {"rpc": "RunExperts", "code": "NOT_FOUND"}
    wait_for(lambda: w0.get_sample_value("moe_requests_total", not_found) == 1, "the NOT_FOUND count", 10)
    assert w0.get_sample_value("moe_requests_in_flight", {"rpc": "RunExperts"}) == 0
    assert w0.get_sample_value("moe_received_bytes_total", {"rpc": "RunExperts"}) > sent


def test_registries_are_per_instance():
    a, b = ServiceMetrics("gateway"), ServiceMetrics("gateway")
    a.observe_batch("Forward", 7)
    assert a.registry.get_sample_value("moe_tokens_total", {"rpc": "Forward"}) == 7
    assert b.registry.get_sample_value("moe_tokens_total", {"rpc": "Forward"}) is None


def test_expert_server_cli_serves_metrics_and_takes_its_entry_by_ordinal(processes, tiny_checkpoint, tmp_path):
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"servers": [
        {"name": "alpha", "address": "a:1", "experts": "0-3"},
        {"name": "beta", "address": "b:1", "experts": {"0": "4-7", "1": "6"}}]}))
    metrics_port = free_port()
    server = launch("expert-server", tmp_path / "server.log", console_script=True, checkpoint=tiny_checkpoint,
                    placement=placement, placement_index=1, metrics_host="127.0.0.1", metrics_port=metrics_port)
    processes.append(server)
    with ExpertClient(server.wait_ready(60).address) as client:
        assert client.info().server_name == "beta"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    code, out = server.stop(), server.output()
    assert code == 0, out
    assert re.search(r'^moe_server_info\{.*name="beta".*service="expert_server".*\} 1\.0$', text, re.M), text
    held = set(re.findall(r'^moe_expert_tokens_total\{expert="(\d+)",layer="(\d+)"\} 0\.0$', text, re.M))
    assert held == {(str(e), "0") for e in range(4, 8)} | {("6", "1")}
    assert f"http://127.0.0.1:{metrics_port}/metrics" in out and "Loading experts" in out


def test_pick_entry_by_ordinal_or_name():
    entries = [ServerEntry(f"s{i}", f"h{i}:1", "0") for i in range(3)]
    assert pick_entry("p.json", entries, index="hostname", hostname="moe-expert-2").name == "s2"
    assert pick_entry("p.json", entries, index="1").name == "s1"
    assert pick_entry("p.json", entries, name="s0").name == "s0"
    with pytest.raises(PlacementError, match=r"placement index 3 is out of range: .* 3 servers \(0-2\)"):
        pick_entry("p.json", entries, index="hostname", hostname="moe-expert-3")
    with pytest.raises(PlacementError, match=r"host name 'worker' does not end in -N"):
        pick_entry("p.json", entries, index="hostname", hostname="worker")
    with pytest.raises(PlacementError, match=r"has no server named 'x'"):
        pick_entry("p.json", entries, name="x")


@pytest.mark.parametrize("parser", [expert_parser, gateway_parser])
def test_help_explains_every_flag_and_its_environment_variable(parser):
    for action in parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "env MOE_" in action.help, f"{action.option_strings} lacks help naming MOE_*"


def test_load_progress_in_a_log_prints_whole_lines():
    out = io.StringIO()
    progress = LoadProgress(3, stream=out, every=3600.0)
    for expert in range(3):
        progress(0, expert)
    lines = out.getvalue().splitlines()
    assert lines == [lines[-1]] and "3/3 100%" in lines[0] and "\r" not in out.getvalue()


TALLY_CASES = [("cpu", torch.float32)] + ([("cuda:0", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,dtype", TALLY_CASES)
def test_expert_token_counts_are_the_banks_tallies_of_held_experts(device, dtype):
    """Tokens per expert are tallied inside the bank's computation (on a GPU, in its CUDA graphs): unused slots
    and experts held elsewhere are not counted, held experts show at zero, and a read loses no later call."""
    held, num_experts = (0, 5, 9), 16
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    experts = {(3, e): ExpertWeights(*(torch.randn(shape, generator=gen) / 8 for shape in ((24, 64), (24, 64),
                                                                                        (64, 24)))).to(device, dtype)
               for e in held}
    bank = ExpertBank(experts, num_experts=num_experts, hidden_size=64, dtype=dtype)
    m = ServiceMetrics("expert_server")
    m.init_experts(bank.owned)
    m.expert_tokens.watch(bank.drain_token_counts)
    want = torch.zeros(num_experts, dtype=torch.long)
    for tokens in (5, 37, 20, 37, 3):  # CUDA graphs: a new bucket, one replayed, a read between calls
        ids = torch.from_numpy(np.random.default_rng().integers(-1, num_experts, (tokens, 3)))
        bank.compute(3, torch.randn(tokens, 64, generator=gen).to(dtype), ids.to(device),
                     torch.rand(tokens, 3, generator=gen).to(device))
        want += torch.bincount(ids[ids >= 0], minlength=num_experts)
        if tokens == 20:
            assert m.expert_tokens.value(3, 5) == want[5]
    got = {s.labels["expert"]: s.value for f in m.registry.collect() if f.name == "moe_expert_tokens"
           for s in f.samples}
    assert got == {str(e): want[e].item() for e in held}
    assert m.expert_tokens.value(3, 7) == 0  # held elsewhere: skipped, not counted


def test_generate_carries_its_request_id_and_counts_tokens(cluster, causal_checkpoints, access_log):
    path = causal_checkpoints["mixtral"]
    gateway = cluster.gateway(path, [cluster.expert_server(path, experts=e) for e in ("0-2", "3-7")])
    with GatewayClient(gateway) as client:
        assert len(list(client.generate([3, 1, 4, 1], max_new_tokens=3, ignore_eos=True))) == 3
    registry = cluster.servicers[gateway].metrics.registry
    assert registry.get_sample_value("moe_tokens_total", {"rpc": "Generate"}) == 4 + 3  # prompt + generated
    # The stream's end reaches the client before the gateway's access log line after it.
    generate = wait_for(lambda: [rid for _, rid, msg in access_log.seen if msg.startswith("Generate OK")],
                        "the Generate access log line", 10)
    run_experts = {rid for _, rid, msg in access_log.seen if msg.startswith("RunExperts OK")}
    assert len(generate) == 1 and run_experts == set(generate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_and_weights_are_reported(loop_thread, tiny_checkpoint):
    handle, servicer = loop_thread.run(create_server(ExpertServerConfig(
        checkpoint=str(tiny_checkpoint), devices="cuda:0", host="127.0.0.1", port=0)))
    try:
        rng = np.random.default_rng()
        with ExpertClient(f"127.0.0.1:{handle.port}") as client:
            client.run_experts(0, rng.standard_normal((16, 64), dtype=np.float32),
                               rng.integers(0, 8, (16, 2)).astype(np.int32), np.full((16, 2), 0.5, np.float32))
        registry = servicer.metrics.registry
        weights = registry.get_sample_value("moe_weight_bytes", {"device": "cuda:0"})
        allocated = registry.get_sample_value("moe_device_memory_bytes", {"device": "cuda:0", "kind": "allocated"})
        peak = registry.get_sample_value("moe_device_memory_bytes", {"device": "cuda:0", "kind": "peak_allocated"})
        assert weights == servicer.bank.nbytes() > 0
        assert peak >= allocated >= weights
    finally:
        loop_thread.run(handle.stop(0))
