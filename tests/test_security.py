"""TLS, mutual TLS and token auth with a throwaway CA: who is refused and who is served."""

import os
import subprocess

import grpc
import numpy as np
import pytest

from moe_client import ExpertClient, GatewayClient
from moe_client.security import TLSFiles
from moe_serve.expert_server.config import build_parser as expert_parser
from moe_serve.expert_server.config import config_from_args as expert_config
from moe_serve.gateway.config import build_parser as gateway_parser
from moe_serve.gateway.config import config_from_args as gateway_config
from moe_serve.gateway.pool import StartupError
from moe_serve.rpc.options import ServingOptions
from tests.support import BIN
from tests.support.certs import CA
from tests.support.references import plain_torch, reference_forward

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(directory, "moe-test-ca"), CA(directory, "rogue-ca")
    return {"ca": ca.pem, "expert": ca.issue("expert"), "gateway": ca.issue("gateway"),
            "client": ca.issue("client"), "rogue": rogue.issue("rogue-client")}


@pytest.fixture
def secure_cluster(cluster, tiny_checkpoint, pki):
    """Expert servers that take only callers with a certificate from the CA, and a TLS gateway with a token."""
    expert_side = ServingOptions(tls=TLSFiles(pki["ca"], pki["expert"].cert, pki["expert"].key),
                                 require_client_cert=True)
    servers = [cluster.expert_server(tiny_checkpoint, experts=e, serving=expert_side) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(
        tiny_checkpoint, servers, expert_tls=TLSFiles(pki["ca"], pki["gateway"].cert, pki["gateway"].key),
        serving=ServingOptions(tls=TLSFiles(None, pki["gateway"].cert, pki["gateway"].key), auth_token=TOKEN))
    return gateway, servers


def hidden_states() -> np.ndarray:
    return np.random.default_rng().standard_normal((2, 5, 64), dtype=np.float32)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.details()
    return err.value


def test_client_needs_tls_and_token(secure_cluster, tiny_checkpoint, pki):
    gateway, _ = secure_cluster
    hidden = hidden_states()
    with GatewayClient(gateway, timeout=10, tls=TLSFiles(ca=pki["ca"]), token=TOKEN) as client:
        assert np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    with GatewayClient(gateway, timeout=5) as plaintext:
        assert refused(lambda: plaintext.forward(hidden)).code() == grpc.StatusCode.UNAVAILABLE
    with GatewayClient(gateway, timeout=5, tls=TLSFiles(ca=pki["ca"])) as no_token:
        err = refused(lambda: no_token.forward(hidden))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.details()
        assert refused(no_token.model_info).code() == grpc.StatusCode.UNAUTHENTICATED
        assert no_token.health() == "SERVING"  # probes need no token
    with GatewayClient(gateway, timeout=5, tls=TLSFiles(ca=pki["ca"]), token="wrong") as wrong:
        assert refused(lambda: wrong.forward(hidden)).code() == grpc.StatusCode.UNAUTHENTICATED


def test_expert_servers_take_only_certified_callers(secure_cluster, tiny_checkpoint, pki):
    _, servers = secure_cluster
    rng = np.random.default_rng()
    hidden, ids, weights = (rng.standard_normal((3, 64), dtype=np.float32), rng.integers(0, 4, (3, 2)),
                            rng.random((3, 2), dtype=np.float32))
    refusals = {
        "plaintext": None,
        "TLS without a certificate": TLSFiles(ca=pki["ca"]),
        "a certificate from another CA": TLSFiles(pki["ca"], pki["rogue"].cert, pki["rogue"].key),
    }
    for what, tls in refusals.items():
        with ExpertClient(servers[0], timeout=5, tls=tls) as client:
            err = refused(lambda c=client: c.run_experts(0, hidden, ids, weights))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, what
    with ExpertClient(servers[0], timeout=10, tls=TLSFiles(pki["ca"], pki["gateway"].cert, pki["gateway"].key)) as ok:
        assert np.abs(ok.run_experts(0, hidden, ids, weights)
                      - plain_torch(tiny_checkpoint, 0, hidden, ids, weights)).max() <= 1e-5


def test_gateway_can_require_client_certificates(cluster, tiny_checkpoint, pki):
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server], serving=ServingOptions(
        tls=TLSFiles(pki["ca"], pki["gateway"].cert, pki["gateway"].key), require_client_cert=True))
    hidden = hidden_states()
    with GatewayClient(gateway, timeout=5, tls=TLSFiles(ca=pki["ca"])) as anonymous:
        assert refused(lambda: anonymous.forward(hidden)).code() == grpc.StatusCode.UNAVAILABLE
    with GatewayClient(gateway, timeout=10, tls=TLSFiles(pki["ca"], pki["client"].cert, pki["client"].key)) as client:
        assert np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5


def test_gateway_without_a_certificate_cannot_start(cluster, tiny_checkpoint, pki):
    server = cluster.expert_server(tiny_checkpoint, serving=ServingOptions(
        tls=TLSFiles(pki["ca"], pki["expert"].cert, pki["expert"].key), require_client_cert=True))
    with pytest.raises(StartupError) as err:
        cluster.gateway(tiny_checkpoint, [server], connect_timeout=1.0, expert_tls=TLSFiles(ca=pki["ca"]))
    print(err.value)
    assert "DEADLINE_EXCEEDED" not in str(err.value)


def test_flags_and_cli(cluster, tiny_checkpoint, pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["--checkpoint", str(tiny_checkpoint), "--tls-cert", pki["gateway"].cert, "--tls-key", pki["gateway"].key,
            "--tls-ca", pki["ca"], "--require-client-cert"]
    expert = expert_config(expert_parser().parse_args(args))
    assert expert.serving.require_client_cert and expert.serving.tls.cert == pki["gateway"].cert
    gateway = gateway_config(gateway_parser().parse_args([*args, "--servers", "a:1", "--auth-token-file",
                                                          str(token_file), "--expert-tls-ca", pki["ca"]]))
    assert gateway.serving.auth_token == TOKEN and gateway.expert_tls == TLSFiles(ca=pki["ca"])
    with pytest.raises(ValueError, match="needs --tls-cert"):
        expert_config(expert_parser().parse_args(["--checkpoint", "x", "--require-client-cert"]))

    server = cluster.expert_server(tiny_checkpoint)
    address = cluster.gateway(tiny_checkpoint, [server], serving=ServingOptions(
        tls=TLSFiles(None, pki["gateway"].cert, pki["gateway"].key), auth_token=TOKEN))
    cli = [str(BIN / "moe-client"), "--address", address, "--tls-ca", pki["ca"], "forward"]
    run = subprocess.run([*cli, "--shape", "3,64"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MOE_TOKEN": TOKEN}, check=False)
    assert run.returncode == 0 and "Distributed inference complete!" in run.stdout, run.stderr
    run = subprocess.run([*cli, "--shape", "3,64"], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and "UNAUTHENTICATED" in run.stderr
