"""`moe-serve inspect`: sizes from the file headers, and a balanced placement the services accept."""

import json
import subprocess

import pytest

from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import spec_from_config
from moe_serve.model.placement import balanced_assignment, missing_pairs, read_placement, resolve_ownership
from moe_serve.tools.inspect_checkpoint import dense_bytes, expert_bytes
from tests.support import BIN


def test_inspect_prints_sizes_and_writes_a_placement(causal_checkpoints, tmp_path):
    path = causal_checkpoints["deepseek"]
    placement = tmp_path / "placement.json"
    run = subprocess.run([str(BIN / "moe-serve"), "inspect", str(path), "--servers", "3", "--addresses",
                          "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "--write-placement", str(placement)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    checkpoint = Checkpoint(path)
    # deepseek test config: 5 layers, MoE at 2 and 4, experts of width 16 over hidden 48 in float32.
    assert "model_type deepseek" in run.stdout
    assert "MoE layers 2,4 (2), dense MLP layers 0-1,3" in run.stdout
    assert f"bytes per expert: {3 * 16 * 48 * 4 / 1024:.2f} KiB ({3 * 16 * 48 * 4} B, F32)" in run.stdout
    assert expert_bytes(checkpoint, 2, 0) == 3 * 16 * 48 * 4
    total_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    dense, _ = dense_bytes(checkpoint)
    assert 0 < total_bytes - (dense + 2 * 8 * 3 * 16 * 48 * 4) < 64 * 1024  # only the file headers are left
    entries = read_placement(placement)
    assert [e.address for e in entries] == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    owned = [resolve_ownership(checkpoint.spec, e.experts) for e in entries]
    assert not missing_pairs(checkpoint.spec, owned)
    assert sorted(sum(len(ids) for ids in o.values()) for o in owned) == [5, 5, 6]  # 16 experts, 3 servers


@pytest.mark.parametrize("experts,servers", [(8, 3), (64, 3), (64, 4), (6, 12)])
def test_balanced_assignment_covers_each_expert_once(experts, servers):
    spec = spec_from_config({"model_type": "simple_moe", "hidden_size": 8, "num_hidden_layers": 27,
                             "num_experts": experts, "num_experts_per_tok": 2, "intermediate_size": 8})
    owned = balanced_assignment(spec, servers)
    for layer in spec.moe_layers:
        ids = sorted(e for o in owned for e in o.get(layer, ()))
        assert ids == list(range(experts))
    totals = [sum(len(ids) for ids in o.values()) for o in owned]
    assert max(totals) - min(totals) <= 1


def test_inspect_names_a_bad_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    run = subprocess.run([str(BIN / "moe-serve"), "inspect", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 2 and "unsupported model_type 'llama'" in run.stderr
