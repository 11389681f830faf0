"""Soak: expert server replicas and a gateway as real processes on loopback, under steady concurrent
Forward and Generate load; prints requests served, errors and each process's memory (RSS) over time.

    python scripts/soak.py --duration 600 --chaos-every 60   # by hand: 10 minutes, a replica killed each minute
    python scripts/soak.py --duration 60 --json soak.json    # what CI runs (tests/test_soak.py)

The model is a tiny random Mixtral (built with transformers, as the tests build theirs) so that both
RPCs run; --model simple serves the embedded simple_moe (Forward only). Every answer is checked
against the in-process reference on the same weights; a wrong answer counts as an error. With
--chaos-every N, one replica is killed with SIGKILL every N seconds and restarted after --down-for
seconds; the report says how long each took to serve again and to rejoin the gateway. Exit status 1
if any request failed. The fault tests use ProcessCluster and Load from here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import torch

from moe_client import GatewayClient
from moe_serve.checkpoint import Checkpoint
from moe_serve.core.generation import SamplingParams
from moe_serve.gateway.engine import GatewayEngine
from moe_serve.models import load_all_experts, load_dense_model
from moe_serve.synthetic import SyntheticConfig, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Service:
    """One service process: its command line, port and log file; restartable."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, host: str = "127.0.0.1"):
        self.name, self.argv, self.port, self.log, self.host = name, argv, port, log, host
        self.popen: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Start (or start again) with the same command line, appending to self.log."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "a") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` (SIGKILL: a crash; SIGTERM: a graceful stop)."""
        if self.alive:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; the exit status (negative: killed by that signal)."""
        return self.popen.wait(timeout)

    def rss(self) -> float:
        """Resident memory in MiB, 0 when not running."""
        return rss_mib(self.popen.pid) if self.alive else 0.0


def expert_argv(checkpoint: Path, name: str, host: str, port: int, experts: str = "all") -> list[str]:
    """Command line of one expert server."""
    return [sys.executable, "-m", "moe_serve.expert_server.main", "--checkpoint", str(checkpoint), "--name", name,
            "--experts", experts, "--host", host, "--port", str(port), "--grace", "30", "--log-level", "WARNING"]


class ProcessCluster:
    """`replicas` expert servers, each owning every expert, and a gateway over them, all as processes."""

    def __init__(self, checkpoint: Path, workdir: Path, replicas: int = 2, gateway_args: tuple[str, ...] = (),
                 host: str = "127.0.0.1"):
        self.checkpoint = checkpoint
        self.experts = []
        for i in range(replicas):
            port = free_port(host)
            self.experts.append(Service(f"expert{i}", expert_argv(checkpoint, f"expert{i}", host, port), port,
                                        workdir / f"expert{i}.log", host))
        port = free_port(host)
        servers = ",".join(s.address for s in self.experts)
        argv = [sys.executable, "-m", "moe_serve.gateway.main", "--checkpoint", str(checkpoint), "--servers",
                servers, "--host", host, "--port", str(port), "--connect-timeout", "120", "--log-level", "WARNING",
                *gateway_args]
        self.gateway = Service("gateway", argv, port, workdir / "gateway.log", host)
        self.address = self.gateway.address

    @property
    def services(self) -> list[Service]:
        return [*self.experts, self.gateway]

    def start(self, timeout: float = 120.0) -> None:
        """Start every process and wait until the gateway is SERVING."""
        for svc in self.services:
            svc.start()
        with GatewayClient(self.address) as client:
            client.wait_until_serving(timeout)

    def live_servers(self) -> list[str]:
        """Addresses of the expert servers the gateway routes to now."""
        with GatewayClient(self.address, timeout=5) as client:
            return [s.address for s in client.model_info().servers]

    def wait_listed(self, svc: Service, timeout: float = 120.0) -> tuple[float, float]:
        """After a (re)start of `svc`: seconds until it is SERVING itself, then until the gateway lists it."""
        start = time.monotonic()
        ready = None
        with GatewayClient(svc.address, timeout=2) as own:
            while time.monotonic() - start < timeout:
                try:
                    if ready is None and own.health() == "SERVING":
                        ready = time.monotonic()
                    if ready is not None and svc.address in self.live_servers():
                        return ready - start, time.monotonic() - ready
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{svc.name} not back in the gateway's server list after {timeout:.0f}s")

    def rss(self) -> dict[str, float]:
        """RSS in MiB of each process."""
        return {svc.name: round(svc.rss(), 1) for svc in self.services}

    def stop(self) -> dict[str, int]:
        """SIGTERM everything, wait, and return exit statuses (SIGKILL whatever does not stop)."""
        codes = {}
        for svc in reversed(self.services):
            svc.signal(signal.SIGTERM)
        for svc in reversed(self.services):
            if svc.popen is None:
                continue
            try:
                codes[svc.name] = svc.wait(60)
            except subprocess.TimeoutExpired:
                svc.signal(signal.SIGKILL)
                codes[svc.name] = svc.wait(10)
        return codes


class Load:
    """Concurrent Forward and Generate callers, each answer checked against the in-process reference.

    Generate is greedy over prompts whose top two logits stay apart by at least `margin` at every step,
    so a last-bit difference in summation order cannot flip a token.
    """

    def __init__(self, address: str, checkpoint: Path, clients: int = 4, tokens: int = 16, timeout: float = 10.0,
                 generate_share: float = 0.5, new_tokens: int = 4, distinct_inputs: int = 16, margin: float = 1e-3):
        ckpt = Checkpoint(checkpoint)
        engine = GatewayEngine(load_dense_model(ckpt), load_all_experts(ckpt))
        rng = np.random.default_rng()
        self.inputs = [rng.standard_normal((tokens, engine.hidden_size), dtype=np.float32)
                       for _ in range(distinct_inputs)]
        self.prompts: list[list[int]] = []
        self.continuations: list[list[int]] = []
        with torch.inference_mode():
            self.expected = [engine.forward(torch.from_numpy(x))[0].numpy() for x in self.inputs]
            while engine.is_causal and generate_share > 0 and len(self.prompts) < distinct_inputs:
                prompt = rng.integers(0, engine.model.spec.vocab_size, size=tokens).tolist()
                out = [t.token_id for t in engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens))]
                logits = engine.prompt_logits([prompt + out[:-1]])[0][len(prompt) - 1:]  # [new_tokens, V]
                top2 = logits.topk(2, dim=-1).values
                if bool(((top2[:, 0] - top2[:, 1]) > margin).all()):
                    self.prompts.append(prompt)
                    self.continuations.append(out)
        self.generate_share = generate_share if self.prompts else 0.0
        self.address, self.clients, self.timeout, self.new_tokens = address, clients, timeout, new_tokens
        self.ok = 0
        self.ok_by_rpc: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []
        self.latencies: list[float] = []
        self.successes: list[float] = []  # completion times (monotonic) of good answers
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        """Start the callers."""
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop the callers and wait for their last calls."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)

    def _call(self, client: GatewayClient, rng: np.random.Generator) -> tuple[str, str | None]:
        """One request, checked: (RPC name, None or what went wrong)."""
        if rng.random() < self.generate_share:
            n = int(rng.integers(len(self.prompts)))
            got = [t.token_id for t in client.generate(self.prompts[n], max_new_tokens=self.new_tokens,
                                                       ignore_eos=True)]
            return "Generate", None if got == self.continuations[n] else "WRONG_ANSWER"
        n = int(rng.integers(len(self.inputs)))
        got = client.forward(self.inputs[n])
        return "Forward", None if np.abs(got - self.expected[n]).max() <= 1e-4 else "WRONG_ANSWER"

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        with GatewayClient(self.address, timeout=self.timeout) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    rpc, problem = self._call(client, rng)
                except grpc.RpcError as err:
                    rpc, problem = "?", f"{err.code().name}: {err.details()}"
                end = time.monotonic()
                with self.lock:
                    if problem is None:
                        self.ok += 1
                        self.ok_by_rpc[rpc] += 1
                        self.latencies.append(end - start)
                        self.successes.append(end)
                    else:
                        self.errors[problem.split(":")[0]] += 1
                        if len(self.first_errors) < 10:
                            self.first_errors.append(problem)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def wait_ok(self, count: int, timeout: float = 120.0) -> None:
        """Block until `count` more good answers arrive; TimeoutError naming the errors otherwise."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.ok}/{target} good answers after {timeout:.0f}s; errors {dict(self.errors)}")
            time.sleep(0.05)

    def longest_gap(self, since: float) -> float:
        """Longest time without a good answer after `since` (monotonic): the outage a fault caused."""
        with self.lock:
            times = [since, *[t for t in self.successes if t >= since]]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def p99_ms(self, last: int = 2000) -> float:
        """99th percentile latency of the last `last` good answers, in ms."""
        with self.lock:
            recent = sorted(self.latencies[-last:])
        return recent[int(0.99 * (len(recent) - 1))] * 1e3 if recent else 0.0


def _chaos(cluster: ProcessCluster, load: Load, svc: Service, down_for: float, at: float) -> dict:
    killed_at = time.monotonic()
    svc.signal(signal.SIGKILL)
    svc.wait(10)
    time.sleep(down_for)
    svc.start()
    ready, listed = cluster.wait_listed(svc)
    gap = load.longest_gap(killed_at)
    print(f"  killed {svc.name} (SIGKILL) and restarted it after {down_for:.0f}s: SERVING {ready:.1f}s later, "
          f"back in the gateway's list {listed:.2f}s after that; longest wait for an answer {gap:.2f}s", flush=True)
    return {"server": svc.name, "at_s": round(at, 1), "serving_after_restart_s": round(ready, 2),
            "rejoined_after_serving_s": round(listed, 2), "longest_gap_s": round(gap, 3)}


def make_model(kind: str, path: Path) -> Path:
    """A tiny random checkpoint: 'mixtral' (a causal LM: Forward and Generate) or 'simple' (Forward only)."""
    if kind == "simple":
        return write_checkpoint(path, SyntheticConfig(hidden_size=64, intermediate_size=128, seed=11))
    sys.path.insert(0, str(ROOT / "tests"))  # the builder the causal LM tests use (needs transformers)
    from hf_models import build_checkpoint

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
              + " ".join(s.name for s in cluster.services), flush=True)
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
