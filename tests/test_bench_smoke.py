"""The benchmark script runs end to end at toy sizes; its outputs (not its timings) are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client"), str(ROOT / "services")])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--sections", "transport,moe",
                           "--out", str(out), "--checkpoints", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] and report["machine"]["torch"]
    for row in report["transport"]:
        assert {"in-process", "torch RPC", "torch RPC tcp-only", "ours unix", "ours tcp"} <= set(row["variants"])
    for row in report["moe"]:  # every distributed variant computed the in-process answer
        assert all(e["max_abs"] <= 1e-5 for e in row["errors"].values()), row["errors"]
    assert "Transport" in proc.stdout and "One MoE layer" in proc.stdout


def _run_module(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    paths = [str(ROOT), str(ROOT / "client"), str(ROOT / "services"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_model_benchmark_on_cpu_matches_one_process(tmp_path):
    """The GPU benchmark's CPU smoke mode: real expert server processes, plain and overlapped steps, and
    the logits of both as the one-process run's (bf16 weights: halves run GEMMs of other shapes)."""
    out = tmp_path / "gpu-model.json"
    _run_module(["-m", "benchmarks.gpu_model", "--tiny", "--device", "cpu", "--servers", "2,2o", "--skip-transformers",
                 "--prefill-batch", "4", "--prefill-len", "64", "--decode-batch", "8", "--decode-steps", "2",
                 "--repeats", "1", "--decode-graphs", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"one_process_1_device", "grpc_2_servers", "grpc_2_servers_overlap"}
    for name in ("grpc_2_servers", "grpc_2_servers_overlap"):
        # --device cpu: the dense layers' arenas are /dev/shm (a GPU host's servers also offer "cuda").
        assert "shm" in rows[name]["shared_kinds"] and rows[name]["logits_rel_error_vs_one_process"] <= 5e-3
        assert rows[name]["prefill_tokens_per_s"] > 0 and rows[name]["decode_tokens_per_s"] > 0
    for row in rows.values():  # --decode-graphs: every row also decoded through core.decode_step
        assert row["decode_staged"]["8"]["tokens_per_s"] == row["decode_staged_tokens_per_s"] > 0


def test_routing_plan_benchmark_checks_both_forms_agree(tmp_path):
    proc = _run_module(["benchmarks/routing_plan.py", "--tokens", "1,300", "--servers", "2,3", "--repeats", "2"],
                       tmp_path)
    assert len(proc.stdout.strip().splitlines()) == 1 + 2 * 2  # header, then one line per (tokens, servers)


def test_decode_step_benchmark_on_cpu_agrees_across_impls(tmp_path):
    """The decode-step benchmark's CPU smoke mode: every impl (graphs through the CPU stand-in recorder)
    and the per-stage breakdown; each impl's logits as the plain forward's (bf16: GEMMs of other shapes
    may round differently, so within bf16's few 1e-3, not exactly)."""
    out = tmp_path / "decode.json"
    _run_module(["-m", "benchmarks.decode_step", "--tiny", "--device", "cpu", "--impls", "forward,eager,graphs",
                 "--batches", "3", "--prompt", "5", "--warmup", "1", "--steps", "2", "--profile", "eager",
                 "--profile-batch", "3", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"forward_b3", "eager_b3", "graphs_b3"}
    for name in ("eager_b3", "graphs_b3"):
        assert report["rows"][name]["logits_rel_error_vs_forward"] <= 5e-3 and "profile" in report["rows"]["eager_b3"]
    assert report["rows"]["graphs_b3"]["captures"] == 1 and report["rows"]["graphs_b3"]["capture_failures"] == []
    assert {"whole step", "routed experts (grouped GEMMs)", "shared experts"} <= set(report["stages"])
