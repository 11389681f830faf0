"""The soak script's CI version: 60 seconds of Forward and Generate load, replicas killed and restarted."""

import json
import os
import subprocess
import sys

from tests.support import ROOT


def test_soak_60_seconds(causal_checkpoints, tmp_path):
    report_path = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "scripts.soak", "--duration", "60", "--interval", "10",
                          "--chaos-every", "20", "--json", str(report_path), "--workdir", str(tmp_path),
                          "--checkpoint", str(causal_checkpoints["mixtral"])],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=dict(os.environ))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["errors"] == 0 and report["served"] > 0, report["first_errors"]
    assert min(report["served_by_rpc"].get("Forward", 0), report["served_by_rpc"].get("Generate", 0)) > 0
    assert len(report["samples"]) >= 5 and len(report["kills"]) >= 1  # a slow restart may leave time for one
    assert set(report["exit_codes"].values()) == {0}  # SIGTERM: every process stopped cleanly
    # no process grows by more than a generous 150 MiB in a minute (a leak per request would)
    assert max(report["rss_growth_mib"].values()) < 150, report["rss_growth_mib"]
    print(run.stdout)
