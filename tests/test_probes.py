"""The Kubernetes readiness probe (deploy/k8s/base), run as the pod runs it, answers for a plaintext
expert server and for one that takes only mutual-TLS callers: moe-client takes the container's
MOE_TLS_CA/CERT/KEY, which the server reads too, so the same probe works either way."""

import os
import subprocess

import pytest
import yaml

from moe_client.security import TLSFiles
from moe_serve.rpc.options import ServingOptions
from tests.support import BIN, ROOT
from tests.support.certs import CA


def readiness_command(port: int) -> list[str]:
    """The expert StatefulSet's readiness probe, pointed at `port` instead of the pod's 50051."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "experts.yaml").read_text())
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    command = container["readinessProbe"]["exec"]["command"]
    assert command[0] == "moe-client" and command[2] == "localhost:50051"
    return [str(BIN / "moe-client"), command[1], f"localhost:{port}", *command[3:]]


def probe(port: int, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    return subprocess.run(readiness_command(port), env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pod_certificate(tmp_path_factory):
    """One CA issues every service's certificate; each names localhost (what the probe dials)."""
    ca = CA(tmp_path_factory.mktemp("pki"), "moe-cluster-ca")
    return ca.pem, ca.issue("moe-expert-0", hosts=("localhost", "moe-expert-0.moe-expert", "127.0.0.1"))


def test_readiness_probe_answers_a_plaintext_server(cluster, tiny_checkpoint):
    address = cluster.expert_server(tiny_checkpoint)
    port = int(address.rsplit(":", 1)[1])
    done = probe(port)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    cluster.stop_one(address)
    assert probe(port).returncode != 0  # nothing listens: the probe fails


def test_readiness_probe_answers_a_mutual_tls_server_with_the_pods_own_files(cluster, tiny_checkpoint,
                                                                            pod_certificate):
    ca, cert = pod_certificate
    serving = ServingOptions(tls=TLSFiles(ca, cert.cert, cert.key), require_client_cert=True)
    port = int(cluster.expert_server(tiny_checkpoint, serving=serving).rsplit(":", 1)[1])
    pod_env = {"MOE_TLS_CA": ca, "MOE_TLS_CERT": cert.cert, "MOE_TLS_KEY": cert.key}  # the server's own env
    done = probe(port, **pod_env)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    assert probe(port).returncode != 0  # plaintext against TLS fails: the env is what makes it work
    assert probe(port, MOE_TLS_CA=ca).returncode != 0  # TLS without a client certificate is refused
