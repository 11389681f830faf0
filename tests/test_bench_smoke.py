"""The benchmark script runs end to end at toy sizes; its outputs (not its timings) are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
