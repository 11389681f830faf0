"""The committed stubs are exactly what `make protos` generates from protos/."""

import subprocess
import sys

from tests.support import ROOT


def test_stubs_match_protos(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False)  # as `make protos` runs it
    assert run.returncode == 0, run.stdout + run.stderr
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.py*")}
    committed = {p.name: p.read_text() for p in (ROOT / "client" / "moe_client" / "pb").glob("*.py*")}
    assert sorted(fresh) == sorted(committed), "stub files differ from protos/: run `make protos`"
    drifted = [name for name in fresh if fresh[name] != committed[name]]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run `make protos`"


def test_generated_imports_resolve():
    from moe_client.pb import experts_pb2_grpc, gateway_pb2_grpc, tensor_pb2

    assert tensor_pb2.DESCRIPTOR.package == "moe.v1"
    assert hasattr(experts_pb2_grpc, "ExpertServiceStub") and hasattr(gateway_pb2_grpc, "GatewayServiceStub")
