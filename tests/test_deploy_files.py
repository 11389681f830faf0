"""deploy/ agrees with itself and with the code: placements cover the model, Prometheus scrapes every
service where it serves /metrics, probes and annotations name the real ports, and the dashboard asks
only for metrics the services define."""

import json
import re

import pytest
import yaml

from moe_serve.model.config import spec_from_config
from moe_serve.model.placement import missing_pairs, read_placement, resolve_ownership
from moe_serve.model.synthetic import SyntheticConfig
from moe_serve.observability.metrics import ServiceMetrics
from moe_serve.observability.serving import ServingMetrics
from tests.support import ROOT
from tests.support.prometheus import render_config

DEPLOY = ROOT / "deploy"
DEMO_SPEC = spec_from_config(SyntheticConfig().to_json())  # the embedded model both deployments serve


def covers_the_model(placement_path):
    entries = read_placement(placement_path)
    owned = [resolve_ownership(DEMO_SPEC, e.experts) for e in entries]
    assert missing_pairs(DEMO_SPEC, owned) == {}
    return entries


def test_compose_placement_servers_and_scrape_targets_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    entries = covers_the_model(DEPLOY / "compose" / "placement.json")
    experts = {name: svc for name, svc in compose.items() if svc.get("command") == ["moe-expert-server"]}
    assert len(experts) >= 3
    assert {e.name for e in entries} == {svc["environment"]["MOE_NAME"] for svc in experts.values()}
    assert {e.address for e in entries} == {f"{name}:50051" for name in experts}
    scraped = {name: svc["environment"]["MOE_METRICS_PORT"] for name, svc in compose.items()
               if svc.get("command") in (["moe-expert-server"], ["moe-gateway"])}
    assert (DEPLOY / "prometheus" / "prometheus.yml").read_text() == render_config(
        [f"gateway:{scraped.pop('gateway')}"], [f"{name}:{port}" for name, port in sorted(scraped.items())], "5s")


def k8s_documents():
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def test_k8s_statefulset_placement_probes_and_annotations_agree(tmp_path):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    placement = tmp_path / "placement.json"
    placement.write_text(docs["ConfigMap", "moe-placement"]["data"]["placement.json"])
    entries = covers_the_model(placement)
    sts = docs["StatefulSet", "moe-expert"]
    service = docs["Service", sts["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["replicas"] == len(entries)
    # Pod N takes entry N, and the gateway finds it at its stable DNS name.
    assert [e.address for e in entries] == [f"moe-expert-{i}.{service['metadata']['name']}:50051"
                                            for i in range(len(entries))]
    for kind, name in (("StatefulSet", "moe-expert"), ("Deployment", "moe-gateway")):
        pod = docs[kind, name]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": int(env["MOE_PORT"]), "metrics": int(env["MOE_METRICS_PORT"])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    expert = sts["spec"]["template"]["spec"]["containers"][0]
    assert expert["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {e["name"]: e["value"] for e in expert["env"]}["MOE_PLACEMENT_INDEX"] == "hostname"


@pytest.mark.parametrize("path", sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")), ids=lambda p: p.name)
def test_dashboard_asks_only_for_defined_metrics(path):
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""], "info": ["_info"]}
    metrics = ServiceMetrics("test")
    ServingMetrics(metrics.registry)  # the gateway's serving metrics
    defined = {family.name + suffix for family in metrics.registry.collect()
               for suffix in suffixes.get(family.type, [""])}
    exprs = [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\b(moe_[a-z_]+)\b", expr)}
    assert used and used <= defined, f"unknown metrics: {sorted(used - defined)}"
