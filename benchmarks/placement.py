"""Placement that follows the load, measured on real processes on loopback (docs/placement.md).

    python -m benchmarks.placement [--window 15] [--repeats 3] [--out bench-results/placement.json]
    python -m benchmarks.placement --load-time-only --device cuda:0     # on a GPU host

1. skew: a mixtral checkpoint whose routers favour experts 0 and 1, on 4 expert servers of 2 experts
   each; steady greedy Generate load; busiest-server tokens over the mean (from the servers' counters
   over a window) before and after `plan` + `rebalance`, and the p99 inter-token latency during the
   rebalance against windows of the same load without a change;
2. kill: 2 replicas of every expert, one killed (SIGKILL) under the same load: failed requests, tokens
   against the no-fault run, p99 inter-token latency in the seconds after the kill against the calm
   window before (2 replicas) and a window later (the 1 replica left: the capacity lost, apart from the
   failover itself);
3. load time: a DeepSeek-MoE-16B-sized expert (hidden 2048, width 1408, bf16: 16.5 MiB) loaded live
   on CPU under Forward load: the admin call's time, and the time until the new replica takes tokens.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moe_client import GatewayClient
from moe_client.admin import AdminClient
from moe_serve.model.synthetic import SyntheticConfig, write_checkpoint
from moe_serve.tools.observed_load import read_cluster
from moe_serve.tools.planner import imbalance, plan
from moe_serve.tools.rebalance import Rebalance, schedule
from tests.support.hf_models import build_checkpoint
from tests.support.launch import launch, stop_all
from tests.support.skewed import skew_router
from tests.support.waiting import wait_for

TOKEN = "bench-admin"
KILL_WINDOW = 5.0  # seconds after a kill -9 counted as "during the kill"


class GenerateLoad:
    """Greedy Generate streams from `clients` threads over fixed prompts; every token's arrival time kept."""

    def __init__(self, address: str, prompts: list[list[int]], clients: int = 3, new_tokens: int = 16):
        self.address, self.prompts, self.new_tokens = address, prompts, new_tokens
        self.gaps: list[tuple[float, float]] = []  # (arrival time, seconds since the stream's previous token)
        self.streams: list[tuple[int, list[int]]] = []  # (prompt index, tokens)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> GenerateLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, index: int) -> None:
        with GatewayClient(self.address, timeout=120) as client:
            n = index
            while not self._stop.is_set():
                n = (n + 1) % len(self.prompts)
                tokens, last = [], None
                try:
                    for token in client.generate(self.prompts[n], max_new_tokens=self.new_tokens, ignore_eos=True):
                        now = time.monotonic()
                        if last is not None:
                            self.gaps.append((now, now - last))
                        last = now
                        tokens.append(token.token_id)
                    self.streams.append((n, tokens))
                except grpc.RpcError as err:
                    self.errors.append(f"{err.code().name}: {err.details()}")

    def p99_ms(self, start: float, end: float) -> float:
        gaps = [g for t, g in list(self.gaps) if start <= t <= end]
        return float(np.percentile(gaps, 99) * 1e3) if gaps else float("nan")


def counters(clients: list[AdminClient]) -> list[float]:
    """Tokens each server has counted so far (every layer and expert)."""
    return [float(sum(e.tokens for e in c.expert_load().experts)) for c in clients]


def measured_balance(clients: list[AdminClient], window: float) -> float:
    """Busiest server's tokens over the mean, counted over `window` seconds of the running load."""
    before = counters(clients)
    time.sleep(window)
    got = [b - a for a, b in zip(before, counters(clients), strict=True)]
    return max(got) / (sum(got) / len(got))


def cluster(checkpoint: Path, workdir: Path, experts: list[str], name: str, **server_options):
    servers = [launch("expert-server", workdir / f"{name}{i}.log", checkpoint=checkpoint, experts=e,
                      name=f"{name}{i}", admin_token_file=workdir / "token", log_level="WARNING",
                      **{"torch_threads": 1, **server_options})
               for i, e in enumerate(experts)]
    gateway = launch("gateway", workdir / f"{name}-gw.log", checkpoint=checkpoint, servers=[s.address for s in servers],
                     connect_timeout=120, log_level="WARNING", rpc_timeout=5, keepalive=1, torch_threads=1)
    gateway.wait_ready(180)
    return servers, gateway


def baseline_tokens(address: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    with GatewayClient(address, timeout=120) as client:
        return [[t.token_id for t in client.generate(p, max_new_tokens=new_tokens, ignore_eos=True)] for p in prompts]


def wrong(load: GenerateLoad, expected: list[list[int]]) -> int:
    return sum(tokens != expected[n] for n, tokens in load.streams)


def skew_phase(workdir: Path, window: float, repeats: int) -> dict:
    checkpoint = skew_router(build_checkpoint("mixtral", workdir / "mixtral", seed=7), {0: 6.0, 1: 6.0})
    servers, gateway = cluster(checkpoint, workdir, ["0-1", "2-3", "4-5", "6-7"], "w")
    admins = [AdminClient(s.address, token=TOKEN, timeout=120) for s in servers]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 160, 8).tolist() for _ in range(6)]
    expected = baseline_tokens(gateway.address, prompts, 16)
    load = GenerateLoad(gateway.address, prompts).start()
    out: dict = {"calm_p99_ms": [], "rebalance_p99_ms": [], "rebalance_seconds": []}
    job = Rebalance(admins, [f"w{i}" for i in range(4)], say=lambda line: None)

    def move(source, destination) -> None:  # one rebalance, timed, with the p99 inter-token latency during it
        start = time.monotonic()
        job.lock()
        try:
            out["rebalance_seconds"].append(round(job.apply(schedule(source, destination, [10**6] * 4)), 2))
        finally:
            job.unlock()
        out["rebalance_p99_ms"].append(load.p99_ms(start, time.monotonic()))

    def calm() -> None:  # the same load, no change
        start = time.monotonic()
        time.sleep(window)
        out["calm_p99_ms"].append(load.p99_ms(start, time.monotonic()))

    try:
        time.sleep(3)
        out["before"] = round(measured_balance(admins, window), 3)
        state = read_cluster(admins)
        original = [s.owned for s in state.servers]
        target = plan(state.grid, state.tokens, state.servers, state.expert_bytes)
        out["plan_expected"] = [round(imbalance(state.grid, state.tokens, o)[0], 3) for o in (original, target)]
        for r in range(repeats):  # there and back: every move is a real rebalance under the load
            calm()
            move(original, target)
            if r == 0:
                out["after"] = round(measured_balance(admins, window), 3)
            calm()
            if r < repeats - 1:
                move(target, original)
    finally:
        load.stop()
        stop_all([gateway, *servers])
    out.update(failed=len(load.errors), wrong_streams=wrong(load, expected), streams=len(load.streams),
               first_errors=load.errors[:3])
    return out


def kill_phase(workdir: Path, window: float, repeats: int) -> dict:
    checkpoint = workdir / "mixtral"
    out: dict = {"calm_p99_ms": [], "kill_p99_ms": [], "one_replica_p99_ms": [], "failed": 0, "wrong_streams": 0,
                 "streams": 0}
    for r in range(repeats):
        servers, gateway = cluster(checkpoint, workdir, ["all", "all"], f"k{r}-")
        rng = np.random.default_rng(2)
        prompts = [rng.integers(0, 160, 8).tolist() for _ in range(6)]
        expected = baseline_tokens(gateway.address, prompts, 16)
        load = GenerateLoad(gateway.address, prompts).start()
        try:
            time.sleep(3)
            calm = time.monotonic()
            time.sleep(window)
            killed = time.monotonic()
            servers[0].signal(signal.SIGKILL)
            time.sleep(KILL_WINDOW)
            settled = time.monotonic()
            time.sleep(window)  # the same load on the one replica left: the capacity lost, apart from the fault
            out["calm_p99_ms"].append(load.p99_ms(calm, killed))
            out["kill_p99_ms"].append(load.p99_ms(killed, settled))
            out["one_replica_p99_ms"].append(load.p99_ms(settled, time.monotonic()))
        finally:
            load.stop()
            stop_all([gateway, *servers])
        out["failed"] += len(load.errors)
        out["wrong_streams"] += wrong(load, expected)
        out["streams"] += len(load.streams)
    return out


def deepseek_sized(path: Path) -> Path:
    """simple_moe with DeepSeek-MoE-16B's expert shape (hidden 2048, width 1408), stored in bf16: 16.5 MiB each."""
    cfg = SyntheticConfig(hidden_size=2048, intermediate_size=1408, num_hidden_layers=2, num_experts=8, seed=3)
    write_checkpoint(path, cfg)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    return path


def load_time_phase(workdir: Path, repeats: int, device: str = "cpu") -> dict:
    checkpoint = deepseek_sized(workdir / "deepseek-sized")
    gpu = {"devices": device, "dtype": "bfloat16", "torch_threads": 4} if device != "cpu" else {"dtype": "bfloat16"}
    servers, gateway = cluster(checkpoint, workdir, ["all", "0-3"], "d", **gpu)
    admin = AdminClient(servers[1].address, token=TOKEN, timeout=120)
    out: dict = {"device": device, "expert_mib": 3 * 2048 * 1408 * 2 / 2**20, "admin_call_s": [], "server_load_s": [],
                 "to_traffic_s": []}
    stop = threading.Event()

    def forward_load() -> None:
        rng = np.random.default_rng()
        with GatewayClient(gateway.address, timeout=120) as client:
            while not stop.is_set():
                client.forward(rng.standard_normal((16, 2048), dtype=np.float32))

    threads = [threading.Thread(target=forward_load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(repeats):
            expert = 4 + n % 4

            def tokens(e: int = expert) -> int:
                return sum(x.tokens for x in admin.expert_load().experts if (x.layer, x.expert) == (0, e))

            seen = tokens()
            start = time.monotonic()
            reply = admin.load({0: [expert]}, device=device)
            out["admin_call_s"].append(time.monotonic() - start)
            out["server_load_s"].append(reply.load_seconds)
            wait_for(lambda seen=seen: tokens() > seen, "the new replica takes tokens", 60, interval=0.01)
            out["to_traffic_s"].append(time.monotonic() - start)
            admin.drop({0: [expert]})
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        stop_all([gateway, *servers])
    return out


def summarise(results: dict) -> None:
    med = statistics.median
    lt = results["load_time"]
    print(f"live load of a {lt['expert_mib']:.1f} MiB expert on {lt['device']}: admin call "
          f"{med(lt['admin_call_s']):.2f} s (server {med(lt['server_load_s']):.2f} s), taking tokens after "
          f"{med(lt['to_traffic_s']):.2f} s (medians of {len(lt['to_traffic_s'])})")
    if "skew" not in results:
        return
    s, k = results["skew"], results["kill"]
    print(f"skew: busiest/mean measured {s['before']} before, {s['after']} after plan + rebalance "
          f"(planned {s['plan_expected'][0]} -> {s['plan_expected'][1]}); rebalance took {s['rebalance_seconds']} s")
    print(f"  Generate during rebalance: failed {s['failed']}, wrong streams {s['wrong_streams']} of {s['streams']}, "
          f"p99 ITL {med(s['rebalance_p99_ms']):.1f} ms vs {med(s['calm_p99_ms']):.1f} ms calm (medians)")
    print(f"kill -9 of 1 of 2 replicas: failed {k['failed']}, wrong streams {k['wrong_streams']} of {k['streams']}, "
          f"p99 ITL {med(k['kill_p99_ms']):.1f} ms in the {KILL_WINDOW:.0f} s after the kill vs "
          f"{med(k['calm_p99_ms']):.1f} ms calm on 2 replicas and {med(k['one_replica_p99_ms']):.1f} ms later on "
          "the 1 left (medians)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=15.0, help="seconds per measured window (default 15)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each change (default 3)")
    p.add_argument("--load-time-only", action="store_true", help="only the live load time (e.g. on a GPU host)")
    p.add_argument("--device", default="cpu", help="device of the live load-time phase (cuda:0 on a GPU host)")
    p.add_argument("--out", default="bench-results/placement.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="moe-placement-") as tmp:
        workdir = Path(tmp)
        (workdir / "token").write_text(TOKEN)
        results = {} if args.load_time_only else {"skew": skew_phase(workdir, args.window, args.repeats),
                                                   "kill": kill_phase(workdir, args.window, args.repeats)}
        results["load_time"] = load_time_phase(workdir, max(5, args.repeats), args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    summarise(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
