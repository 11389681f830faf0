"""`moe-serve plan` and `moe-serve rebalance` against running servers on loopback: a skewed checkpoint
planned from the servers' own counters and moved under checked load with no failed request; bad
placements and concurrent rebalances refused, naming the problem, with nothing changed."""

import json
import re

import pytest

from moe_client.admin import AdminClient
from moe_serve.model.synthetic import write_checkpoint
from moe_serve.tools.cli import main
from moe_serve.tools.observed_load import prometheus_tokens, read_cluster
from tests.support.checkpoints import TINY
from tests.support.load import Load
from tests.support.prometheus import Prometheus, render_config, require
from tests.support.skewed import skew_router

TOKEN = "admin-secret"
TINY_LAYERS = (0, 1)


@pytest.fixture(scope="module")
def skewed_checkpoint(tmp_path_factory):
    """TINY with experts 0 and 1 favoured by every router (rows x4): tokens go to them about twice as often."""
    return skew_router(write_checkpoint(tmp_path_factory.mktemp("skewed"), TINY), {0: 4.0, 1: 4.0})


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return str(path)


def start(cluster, checkpoint, capacity: str = "") -> tuple[list[str], str]:
    """Four servers of two experts each per layer, and a gateway."""
    servers = [cluster.expert_server(checkpoint, experts=f"{2 * i}-{2 * i + 1}", name=f"w{i}", admin_token=TOKEN,
                                     expert_capacity=capacity if i == 0 else "") for i in range(4)]
    return servers, cluster.gateway(checkpoint, servers)


def infos(servers):
    out = []
    for address in servers:
        with AdminClient(address, token=TOKEN) as admin:
            out.append(admin.info())
    return out


def test_plan_then_rebalance_under_load(cluster, skewed_checkpoint, token_file, tmp_path, capsys):
    servers, gateway = start(cluster, skewed_checkpoint)
    load = Load(gateway, skewed_checkpoint, clients=2).start()
    try:
        load.wait_ok(20)
        plan_file = tmp_path / "plan.json"
        access = ["--admin-token-file", token_file]
        assert main(["plan", "--servers", ",".join(servers), "-o", str(plan_file), *access]) == 0
        out = capsys.readouterr().out
        now, planned = (float(x) for x in re.findall(r"busiest server / mean = ([0-9.]+)", out))
        assert planned < now, out
        assert main(["rebalance", "--placement", str(plan_file), *access]) == 0
        out = capsys.readouterr().out
        assert "Done in" in out, out
        entries = json.loads(plan_file.read_text())["servers"]
        for entry, info in zip(entries, infos(servers), strict=True):
            want = entry["experts"] if isinstance(entry["experts"], dict) else {"0": entry["experts"],
                                                                                "1": entry["experts"]}
            got = {str(le.layer): list(le.experts) for le in info.owned}
            assert got == {k: _ids(v) for k, v in want.items()}, (entry, got)
        load.wait_ok(20)
    finally:
        load.stop()
    assert load.failed == 0, load.first_errors


def _ids(ranges: str) -> list[int]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def write_placement(path, servers, experts):
    path.write_text(json.dumps({"servers": [{"name": f"w{i}", "address": a, "experts": e}
                                            for i, (a, e) in enumerate(zip(servers, experts, strict=True))]}))
    return str(path)


def test_bad_rebalances_are_refused_and_change_nothing(cluster, skewed_checkpoint, token_file, tmp_path, capsys):
    expert_bytes = 3 * 64 * 96 * 4
    servers, _ = start(cluster, skewed_checkpoint, capacity=f"cpu={5 * expert_bytes}B")  # w0: room for 5
    before = infos(servers)
    access = ["--admin-token-file", token_file]
    ok = ["0-1", "2-3", "4-5", "6-7"]
    cases = {
        "an expert the checkpoint lacks": (["0-1,9", *ok[1:]], "expert ids 9 out of range"),
        "the last replica dropped": ([*ok[:3], "6"], "leaves layer 0 experts 7 with no replica"),
        "a server without room": (["0-5", *ok[1:]], "server w0 has no room: the placement gives it 12 experts"),
    }
    for what, (experts, message) in cases.items():
        placement = write_placement(tmp_path / "p.json", servers, experts)
        assert main(["rebalance", "--placement", placement, *access]) == 2, what
        assert message in capsys.readouterr().err, what
        assert infos(servers) == before, what

    with AdminClient(servers[2], token=TOKEN) as admin:  # another rebalance holds one server's lock
        admin.acquire_lock("rebalance-elsewhere", ttl_seconds=60)
        placement = write_placement(tmp_path / "p.json", servers, ["0-1", "2-5", "4-7", "6-7"])
        assert main(["rebalance", "--placement", placement, *access]) == 2
        err = capsys.readouterr().err
        assert "server w2" in err and "lock held by 'rebalance-elsewhere'" in err, err
        assert infos(servers) == before
        admin.release_lock("rebalance-elsewhere")
    with AdminClient(servers[0], token=TOKEN) as admin:  # the refused rebalance gave back the locks it took
        admin.acquire_lock("next")
        admin.release_lock("next")


def test_plan_reads_load_from_prometheus(cluster, skewed_checkpoint, tmp_path):
    servers, gateway = start(cluster, skewed_checkpoint)
    services = [cluster.servicers[s] for s in (*servers, gateway)]
    metrics = [f"127.0.0.1:{servicer.metrics.serve('127.0.0.1', 0)}" for servicer in services]
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config(metrics[-1:], metrics[:-1], "1s"))
    require("prometheus")
    prometheus = Prometheus(config, tmp_path)
    load = Load(gateway, skewed_checkpoint, clients=2)
    try:
        prometheus.wait_ready()
        prometheus.wait_for('count(up{job=~"moe-.*"} == 1)', lambda v: v.get("") == 5)
        load.start()
        load.wait_ok(40)
        load.stop()
        clients = [AdminClient(s, token=TOKEN) for s in servers]
        counted = read_cluster(clients).tokens
        # Every series was scraped at zero before the load (held experts start at zero); once Prometheus has
        # the final counts too, increase() over the window is each count, scaled alike by extrapolation.
        total = sum(counted.values())
        prometheus.wait_for("sum(moe_expert_tokens_total)", lambda v: v.get("") == total)
        scraped = prometheus_tokens(prometheus.url, 120)
        # Prometheus started just before the load, so the window covers all of it: each expert's count exactly.
        assert counted and scraped.keys() >= counted.keys()
        for key, count in counted.items():
            assert scraped[key] == count, (key, counted, scraped)
    finally:
        load.stop()
        prometheus.stop()
        for servicer in services:
            servicer.metrics.close()
