"""`moe-serve plan` and `moe-serve rebalance`: placement from observed load, applied to running servers."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_client.security import TLSFiles
from moe_serve.model.placement import placement_entries, read_placement, resolve_ownership, write_placement
from moe_serve.process.env import env
from moe_serve.tools.observed_load import connect, owned_now, read_cluster
from moe_serve.tools.planner import describe, imbalance, plan
from moe_serve.tools.rebalance import Rebalance, check_target, schedule


def _access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-token-file", default=env("ADMIN_TOKEN_FILE"),
                   help="file holding the expert servers' admin token (env MOE_ADMIN_TOKEN_FILE)")
    p.add_argument("--tls-ca", default=env("TLS_CA"), help="CA of the servers' certificates (env MOE_TLS_CA)")
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="client certificate for mutual TLS (env MOE_TLS_CERT)")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="its key (env MOE_TLS_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per admin call (default 120)")


def add_parsers(sub) -> None:
    """The plan and rebalance subcommands."""
    p = sub.add_parser("plan", help="a placement from the servers' observed per-expert load (EPLB-style)")
    p.add_argument("--servers", required=True, help="expert server addresses, comma-separated")
    p.add_argument("--window", type=float, default=0.0,
                   help="seconds of load to measure now (two readings); 0: the counters since each server started")
    p.add_argument("--prometheus", default="", help="read load from this Prometheus (http://host:9090) instead, "
                   "increase over --window (default 300 s)")
    p.add_argument("--redundant", type=int, default=None,
                   help="extra replicas per layer for the hottest experts (default: one per server, as room allows)")
    p.add_argument("--output", "-o", default="", help="write the placement file here")
    _access_args(p)
    r = sub.add_parser("rebalance", help="apply a placement file to running expert servers, step by step")
    r.add_argument("--placement", required=True, help="placement file (from moe-serve plan, or by hand)")
    r.add_argument("--dry-run", action="store_true", help="check and print the steps, change nothing")
    _access_args(r)


def _clients(args: argparse.Namespace, addresses: list[str]):
    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else None
    return connect(addresses, TLSFiles.of(args.tls_ca, args.tls_cert, args.tls_key), token, args.timeout)


def run_plan(args: argparse.Namespace) -> int:
    addresses = [a.strip() for a in args.servers.split(",") if a.strip()]
    clients = _clients(args, addresses)
    cluster = read_cluster(clients, args.window, args.prometheus)
    names = [s.name for s in cluster.servers]
    source = ("Prometheus" if args.prometheus else f"the last {args.window:.0f} s" if args.window
              else "the servers' counters since start")
    print(f"Load: {sum(cluster.tokens.values()):,.0f} routed (token, expert) pairs from {source}, "
          f"{len(cluster.grid.moe_layers)} MoE layers x {cluster.grid.num_experts} experts")
    before = [s.owned for s in cluster.servers]
    after = plan(cluster.grid, cluster.tokens, cluster.servers, cluster.expert_bytes, args.redundant)
    for label, owned in (("now", before), ("plan", after)):
        total, worst = imbalance(cluster.grid, cluster.tokens, owned)
        print(f"{label}: busiest server / mean = {total:.3f} (worst layer {worst:.3f})")
        for name, mine in zip(names, owned, strict=True):
            print(f"  {name}: {describe(mine)}")
    if args.output:
        write_placement(args.output, placement_entries(cluster.grid, after, addresses, names))
        print(f"Placement written to {args.output}; apply it with: moe-serve rebalance --placement {args.output}")
    return 0


def run_rebalance(args: argparse.Namespace) -> int:
    entries = read_placement(args.placement)
    clients = _clients(args, [e.address for e in entries])
    names = [e.name for e in entries]
    cluster = read_cluster(clients)
    target = [resolve_ownership(cluster.grid, e.experts) for e in entries]
    slots = [s.capacity_bytes // cluster.expert_bytes for s in cluster.servers]
    check_target(cluster.grid, names, target, slots, cluster.expert_bytes)
    schedule([s.owned for s in cluster.servers], target, slots)  # an order exists: checked before any lock
    job = Rebalance(clients, names)
    if args.dry_run:
        rounds = schedule([s.owned for s in cluster.servers], target, slots)
        for number, steps in enumerate(rounds, 1):
            for step in steps:
                print(f"  round {number}: {step.kind} {describe(step.ownership())} on {names[step.server]}")
        return 0
    job.lock()
    try:
        rounds = schedule(owned_now(clients), target, slots)  # under the locks: nobody else changes them now
        print(f"Rebalancing {len(clients)} servers in {len(rounds)} round(s) (lock {job.holder})")
        seconds = job.apply(rounds)
    finally:
        job.unlock()
    print(f"Done in {seconds:.2f} s; every server holds its placement entry")
    return 0
