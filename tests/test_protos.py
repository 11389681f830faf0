"""The committed stubs are exactly what `make protos` generates from protos/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_match_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.name: p.read_text() for p in gen.generate(tmp_path)}
    committed = {p.name: p.read_text() for p in (ROOT / "client" / "moe_client" / "pb").glob("*.py*")}
    assert sorted(fresh) == sorted(committed), "stub files differ from protos/: run `make protos`"
    drifted = [name for name in fresh if fresh[name] != committed[name]]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run `make protos`"


def test_generated_imports_resolve():
    from moe_client.pb import experts_pb2_grpc, gateway_pb2_grpc, tensor_pb2

    assert tensor_pb2.DESCRIPTOR.package == "moe.v1"
    assert hasattr(experts_pb2_grpc, "ExpertServiceStub") and hasattr(gateway_pb2_grpc, "GatewayServiceStub")
