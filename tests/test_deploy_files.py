"""deploy/ agrees with itself and with the code: placements cover the model and survive losing any one
server, Prometheus scrapes every service where it serves /metrics, the Kubernetes overlays (rendered by
kubectl kustomize) meet the restricted Pod Security level and keep every expert served through
disruptions, probes and annotations name the real ports, and the dashboard and alerts ask only for
metrics the services define."""

import functools
import json
import re
import subprocess

import pytest
import yaml

from moe_serve.model.config import spec_from_config
from moe_serve.model.placement import missing_pairs, read_placement, resolve_ownership
from moe_serve.model.synthetic import SyntheticConfig
from moe_serve.observability.metrics import ServiceMetrics
from moe_serve.observability.serving import ServingMetrics
from tests.support import ROOT
from tests.support.prometheus import render_config, require

DEPLOY = ROOT / "deploy"
DEMO_SPEC = spec_from_config(SyntheticConfig().to_json())  # the embedded model both deployments serve
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir())
def serves_every_expert_without_any_one_server(placement_path):
    entries = read_placement(placement_path)
    owned = [resolve_ownership(DEMO_SPEC, e.experts) for e in entries]
    assert missing_pairs(DEMO_SPEC, owned) == {}
    for lost in range(len(entries)):
        left = owned[:lost] + owned[lost + 1:]
        assert missing_pairs(DEMO_SPEC, left) == {}, f"losing {entries[lost].name} leaves experts unserved"
    return entries


def test_compose_placement_servers_and_scrape_targets_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    entries = serves_every_expert_without_any_one_server(DEPLOY / "compose" / "placement.json")
    experts = {name: svc for name, svc in compose.items() if svc.get("command") == ["moe-expert-server"]}
    assert len(experts) >= 3
    assert {e.name for e in entries} == {svc["environment"]["MOE_NAME"] for svc in experts.values()}
    assert {e.address for e in entries} == {f"{name}:50051" for name in experts}
    scraped = {name: svc["environment"]["MOE_METRICS_PORT"] for name, svc in compose.items()
               if svc.get("command") in (["moe-expert-server"], ["moe-gateway"])}
    assert (DEPLOY / "prometheus" / "prometheus.yml").read_text() == render_config(
        [f"gateway:{scraped.pop('gateway')}"], [f"{name}:{port}" for name, port in sorted(scraped.items())], "5s")
    for name in [*experts, "gateway"]:  # as in Kubernetes: read-only root, no capabilities
        assert compose[name]["read_only"] is True and compose[name]["cap_drop"] == ["ALL"]


@functools.cache
def rendered(overlay: str) -> dict:
    """{(kind, name): object} of `kubectl kustomize deploy/k8s/overlays/<overlay>`."""
    kubectl = require("kubectl", "kubernetes-client")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}


def kustomization(overlay: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())


def pods(docs: dict):
    """(workload, pod spec, its containers and init containers) of every workload."""
    for (kind, name), doc in docs.items():
        if kind in ("Deployment", "StatefulSet"):
            spec = doc["spec"]["template"]["spec"]
            yield f"{kind}/{name}", spec, spec["containers"] + spec.get("initContainers", [])


def env_of(container) -> dict:
    return {e["name"]: e["value"] for e in container["env"]}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_image_and_namespace_are_set_once_in_the_overlay(overlay):
    docs, kust = rendered(overlay), kustomization(overlay)
    (image,) = kust["images"]
    for workload, _, containers in pods(docs):
        for c in containers:
            assert c["image"] == f"{image['newName']}:{image['newTag']}", workload
    for (kind, name), doc in docs.items():
        if kind == "Namespace":
            assert name == kust["namespace"]
        else:
            assert doc["metadata"]["namespace"] == kust["namespace"], (kind, name)
    assert docs["Namespace", kust["namespace"]]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
        "restricted"
    # No other file names an image or a namespace.
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            text = path.read_text()
            assert "namespace:" not in text and not re.search(r"image: (?!moe-serve$)", text, re.M), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pods_meet_the_restricted_pod_security_level(overlay):
    """The restricted profile's rules (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for workload, spec, containers in pods(rendered(overlay)):
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), workload
        assert spec["automountServiceAccountToken"] is False
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= allowed_volumes, (workload, volume)
        for c in containers:
            sc = {**spec["securityContext"], **c["securityContext"]}
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, (workload, c["name"])
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", (workload, c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (workload, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (workload, c["name"])
            assert "add" not in c["securityContext"]["capabilities"] and not sc.get("privileged")
            assert not any("hostPort" in p for p in c.get("ports", []))
            # A read-only root: what is written goes to a volume (/tmp, /model, /dev/shm).
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (workload, c["name"])
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts and env_of(c)["HOME"] == "/tmp", (workload, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_placement_probes_and_disruptions_keep_every_expert_served(overlay, tmp_path):
    docs = rendered(overlay)
    placement = tmp_path / "placement.json"
    placement.write_text(docs["ConfigMap", "moe-placement"]["data"]["placement.json"])
    entries = serves_every_expert_without_any_one_server(placement)
    sts = docs["StatefulSet", "moe-expert"]
    service = docs["Service", sts["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["replicas"] == len(entries)
    # Pod N takes entry N, and the gateway finds it at its stable DNS name.
    assert [e.address for e in entries] == [f"moe-expert-{i}.{service['metadata']['name']}:50051"
                                            for i in range(len(entries))]
    expert_labels = sts["spec"]["template"]["metadata"]["labels"]
    # At most one expert server a node, one down at a time (drains and updates), and the next one only
    # after the gateways had time to re-resolve the last (MOE_RESOLVE_INTERVAL defaults to 10 s).
    anti_affinity = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti_affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname" and selects(term["labelSelector"], expert_labels)
    budget = docs["PodDisruptionBudget", "moe-expert"]["spec"]
    assert budget["maxUnavailable"] == 1 and selects(budget["selector"], expert_labels)
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate" and sts["spec"]["minReadySeconds"] >= 20
    gateway = docs["Deployment", "moe-gateway"]
    assert gateway["spec"]["replicas"] >= 2
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert selects(docs["PodDisruptionBudget", "moe-gateway"]["spec"]["selector"], gateway_labels)
    for kind, name in (("StatefulSet", "moe-expert"), ("Deployment", "moe-gateway")):
        pod = docs[kind, name]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = env_of(container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # Expert servers also take RunExperts frames on their TCP side channel, at a fixed port.
        side = {"tensors": int(env["MOE_TCP_CHANNEL_PORT"])} if kind == "StatefulSet" else {}
        assert ports == {"grpc": int(env["MOE_PORT"]), "metrics": int(env["MOE_METRICS_PORT"]), **side}
        # Readiness asks grpc.health.v1 through moe-client, which takes the container's MOE_TLS_* files,
        # so it works with TLS too; liveness only asks that the port accepts connections.
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:3] == ["moe-client", "--address", f"localhost:{ports['grpc']}"]
        assert command[-3:-1] == ["health", "--wait"]
        assert container["readinessProbe"]["timeoutSeconds"] > float(command[-1])
        assert container["livenessProbe"]["tcpSocket"]["port"] == "grpc"
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert env_of(sts["spec"]["template"]["spec"]["containers"][0])["MOE_PLACEMENT_INDEX"] == "hostname"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_only_gateways_reach_expert_servers_and_podmonitors_scrape_both(overlay):
    docs = rendered(overlay)
    expert_pod = docs["StatefulSet", "moe-expert"]["spec"]["template"]
    gateway_labels = docs["Deployment", "moe-gateway"]["spec"]["template"]["metadata"]["labels"]
    policy = docs["NetworkPolicy", "moe-expert"]["spec"]
    assert selects(policy["podSelector"], expert_pod["metadata"]["labels"]) and policy["policyTypes"] == ["Ingress"]
    by_port = {p["port"]: rule.get("from") for rule in policy["ingress"] for p in rule["ports"]}
    assert set(by_port) == {"grpc", "tensors", "metrics"}
    for port in ("grpc", "tensors"):  # RunExperts by gRPC and over the TCP side channel: from gateways only
        (source,) = by_port[port]
        assert set(source) == {"podSelector"} and selects(source["podSelector"], gateway_labels)
    workloads = {"moe-gateway": ("Deployment", "moe-gateway"), "moe-expert-server": ("StatefulSet", "moe-expert")}
    for name, workload in workloads.items():
        monitor = docs["PodMonitor", name]["spec"]
        pod = docs[workload]["spec"]["template"]
        assert selects(monitor["selector"], pod["metadata"]["labels"])
        (endpoint,) = monitor["podMetricsEndpoints"]
        assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.rules.yml").read_text())
    assert docs["PrometheusRule", "moe-serve"]["spec"]["groups"] == rules["groups"]


def test_k8s_gpu_overlay_puts_experts_and_gateways_on_gpus_in_bf16():
    docs = rendered("gpu")
    (expert,) = docs["StatefulSet", "moe-expert"]["spec"]["template"]["spec"]["containers"]
    (gateway,) = docs["Deployment", "moe-gateway"]["spec"]["template"]["spec"]["containers"]
    assert env_of(expert)["MOE_DEVICES"] == "cuda" and env_of(expert)["MOE_DTYPE"] == "bfloat16"
    assert env_of(gateway)["MOE_DENSE_DEVICE"] == "cuda" and env_of(gateway)["MOE_DENSE_DTYPE"] == "bfloat16"
    for c in (expert, gateway):
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    cpu = rendered("cpu")
    for kind, name in (("StatefulSet", "moe-expert"), ("Deployment", "moe-gateway")):
        (c,) = cpu[kind, name]["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


def defined_metrics() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""], "info": ["_info"]}
    metrics = ServiceMetrics("test")
    ServingMetrics(metrics.registry)  # the gateway's serving metrics
    return {family.name + suffix for family in metrics.registry.collect()
            for suffix in suffixes.get(family.type, [""])}


@pytest.mark.parametrize("path", sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")), ids=lambda p: p.name)
def test_dashboard_asks_only_for_defined_metrics_in_the_chosen_job_and_namespace(path):
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\b(moe_[a-z0-9_]+)\b", expr)}
    assert used and used <= defined_metrics(), f"unknown metrics: {sorted(used - defined_metrics())}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "gateway_job", "expert_job"} <= variables
    for expr in exprs:  # every selector is narrowed to the chosen namespace and a chosen job
        for selector in re.findall(r"\bmoe_[a-z0-9_]+(\{[^}]*\})?", expr):
            assert 'namespace=~"$namespace"' in selector, expr
            assert re.search(r'job=~"\$(gateway|expert)_job\b', selector), expr
    titles = [p["title"] for p in dashboard["panels"]]
    assert any("health" in t.lower() for t in titles)


def test_alert_rules_ask_only_for_defined_metrics_and_pass_their_promtool_tests():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\b(moe_[a-z0-9_]+)\b", expr)}
    assert used <= defined_metrics(), f"unknown metrics: {sorted(used - defined_metrics())}"
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts.test.yml").read_text()))
    assert tested == {r["alert"] for g in rules["groups"] for r in g["rules"]}, "an alert without a test"
    done = subprocess.run([require("promtool"), "test", "rules", "alerts.test.yml"], cwd=DEPLOY / "prometheus",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
