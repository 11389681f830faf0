"""Soak: expert server replicas and a gateway as real processes on loopback, under steady concurrent
Forward and Generate load; prints requests served, errors and each process's memory (RSS) over time.

    python -m scripts.soak --duration 600 --chaos-every 60   # by hand: 10 minutes, a replica killed each minute
    python -m scripts.soak --duration 60 --json soak.json    # what CI runs (tests/test_soak.py)

It runs as a module from the repository root, since it imports the shared test-support package
(tests.support).

The model is a tiny random Mixtral (built with transformers, as the tests build theirs) so that both
RPCs run; --model simple serves the embedded simple_moe (Forward only). Every answer is checked
against the in-process reference on the same weights; a wrong answer counts as an error. With
--chaos-every N, one replica is killed with SIGKILL every N seconds and restarted after --down-for
seconds; the report says how long each took to serve again and to rejoin the gateway. Exit status 1
if any request failed. The processes and the load are tests.support's ProcessCluster and Load, which
the fault tests use too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from moe_serve.model.synthetic import SyntheticConfig, write_checkpoint
from tests.support.launch import ServiceProcess
from tests.support.load import Load
from tests.support.process_cluster import ProcessCluster


def _chaos(cluster: ProcessCluster, load: Load, svc: ServiceProcess, down_for: float, at: float) -> dict:
    killed_at = time.monotonic()
    svc.signal(signal.SIGKILL)
    svc.wait(10)
    time.sleep(down_for)
    svc.start()  # from this short-lived thread: the cluster's processes are not tied to it (no die_with_parent)
    ready, listed = cluster.wait_listed(svc)
    gap = load.longest_gap(killed_at)
    print(f"  killed {svc.label} (SIGKILL) and restarted it after {down_for:.0f}s: SERVING {ready:.1f}s later, "
          f"back in the gateway's list {listed:.2f}s after that; longest wait for an answer {gap:.2f}s", flush=True)
    return {"server": svc.label, "at_s": round(at, 1), "serving_after_restart_s": round(ready, 2),
            "rejoined_after_serving_s": round(listed, 2), "longest_gap_s": round(gap, 3)}


def make_model(kind: str, path: Path) -> Path:
    """A tiny random checkpoint: 'mixtral' (a causal LM: Forward and Generate) or 'simple' (Forward only)."""
    if kind == "simple":
        return write_checkpoint(path, SyntheticConfig(hidden_size=64, intermediate_size=128, seed=11))
    from tests.support.hf_models import build_checkpoint  # the causal LM tests' builder (needs transformers)

    return build_checkpoint("mixtral", path, seed=int.from_bytes(os.urandom(4), "little"))


def soak(args: argparse.Namespace) -> dict:
    """Run the soak and return its report."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moe-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_model(args.model, workdir / "model")
    cluster = ProcessCluster(checkpoint, workdir, args.replicas,
                             ("--rpc-timeout", "5", "--keepalive", "2", "--resolve-interval", "5"))
    report: dict = {"duration_s": args.duration, "clients": args.clients, "tokens": args.tokens,
                    "replicas": args.replicas, "samples": [], "kills": [], "logs": str(workdir)}
    try:
        cluster.start()
        load = Load(cluster.address, checkpoint, args.clients, args.tokens).start()
        print(f"{'t/s':>6} {'served':>8} {'errors':>7} {'req/s':>7} {'p99 ms':>7}  RSS MiB: "
              + " ".join(s.label for s in cluster.services), flush=True)
        start = last_t = time.monotonic()
        last_ok, chaos = 0, None
        while (now := time.monotonic()) - start < args.duration:
            time.sleep(min(args.interval, max(0.0, args.duration - (now - start))))
            kills, elapsed = len(report["kills"]) + (chaos is not None and chaos.is_alive()), time.monotonic() - start
            if (args.chaos_every and (kills + 1) * args.chaos_every <= elapsed < args.duration - args.down_for
                    and (chaos is None or not chaos.is_alive())):
                svc = cluster.experts[kills % len(cluster.experts)]
                chaos = threading.Thread(target=lambda s=svc, a=elapsed: report["kills"].append(
                    _chaos(cluster, load, s, args.down_for, a)), daemon=True)
                chaos.start()
            t = time.monotonic()
            sample = {"t_s": round(t - start, 1), "served": load.ok, "errors": load.failed,
                      "rate_per_s": round((load.ok - last_ok) / (t - last_t), 1), "p99_ms": round(load.p99_ms(), 1),
                      "rss_mib": cluster.rss()}
            report["samples"].append(sample)
            print(f"{sample['t_s']:>6.0f} {load.ok:>8} {load.failed:>7} {sample['rate_per_s']:>7.1f} "
                  f"{sample['p99_ms']:>7.1f}  " + " ".join(f"{v:.0f}" for v in sample["rss_mib"].values()), flush=True)
            last_ok, last_t = load.ok, t
        if chaos is not None:
            chaos.join(180)  # a restart still under way: let it rejoin before the totals
        load.stop()
        report.update(served=load.ok, served_by_rpc=dict(load.ok_by_rpc), errors=load.failed,
                      errors_by_code=dict(load.errors), first_errors=load.first_errors)
    finally:
        report["exit_codes"] = cluster.stop()
    samples = report["samples"]
    if len(samples) >= 2:  # growth after the first interval, once imports and first calls have settled
        report["rss_growth_mib"] = {name: round(samples[-1]["rss_mib"][name] - samples[0]["rss_mib"][name], 1)
                                    for name in samples[0]["rss_mib"]}
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print the summary, write --json, exit 1 on any failed request."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=4, help="concurrent callers (default 4)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per Forward (default 16)")
    p.add_argument("--replicas", type=int, default=2, help="expert servers, each owning every expert (default 2)")
    p.add_argument("--interval", type=float, default=10, help="seconds between report lines (default 10)")
    p.add_argument("--chaos-every", type=float, default=0, help="SIGKILL a replica every N seconds (default off)")
    p.add_argument("--down-for", type=float, default=2, help="seconds a killed replica stays down (default 2)")
    p.add_argument("--model", choices=["mixtral", "simple"], default="mixtral",
                   help="tiny random model to generate: mixtral (Forward + Generate) or simple (Forward only)")
    p.add_argument("--checkpoint", help="serve this checkpoint instead of a generated one")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--workdir", help="directory for the model and the processes' logs (default: a new temp dir)")
    args = p.parse_args(argv)
    report = soak(args)
    print(f"Served {report.get('served', 0)} requests {report.get('served_by_rpc', {})}, "
          f"{report.get('errors', 'n/a')} errors "
          f"{report.get('errors_by_code', {})}; RSS growth (MiB) {report.get('rss_growth_mib')}; "
          f"exit codes {report['exit_codes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report.get("errors") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
