#!/usr/bin/env python3
"""Check through Prometheus's HTTP API that it scrapes the gateway and every expert server, and saw traffic.

Exit 0 when every target is up, the gateway counted at least --forwards Forward calls answered OK, each of
the --experts expert servers counted tokens for its experts, and the alert rules (alerts.rules.yml) are
loaded; else 1 after --timeout seconds.
Standard library only: runs with the host's python3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request


def get(url: str) -> dict:
    """GET a Prometheus API URL; the 'data' of a success answer."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]


def query(base: str, expr: str) -> dict[str, float]:
    """Instant query: {instance (or ''): value}."""
    data = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in data["result"]}


def check(base: str, experts: int, forwards: int) -> tuple[bool, list[str]]:
    """One look: (all good, report lines)."""
    targets = get(f"{base}/api/v1/targets")["activeTargets"]
    lines = [f"target {t['labels']['job']:<18} {t['labels']['instance']:<16} {t['health']:<7} "
             f"last scrape {t['lastScrape'][11:19]} {t.get('lastError') or ''}".rstrip() for t in targets]
    jobs = [t["labels"]["job"] for t in targets if t["health"] == "up"]
    served = sum(query(base, 'moe_requests_total{job="moe-gateway", rpc="Forward", code="OK"}').values())
    tokens = query(base, 'sum by (instance) (moe_expert_tokens_total{job="moe-expert-server"}) > 0')
    calls = query(base, 'sum by (instance) (moe_requests_total{job="moe-expert-server", rpc="RunExperts", code="OK"})')
    lines.append(f"gateway: {served:.0f} Forward calls answered OK (want >= {forwards})")
    lines += [f"expert server {inst}: {tokens.get(inst, 0):.0f} token-expert assignments in {n:.0f} RunExperts calls"
              for inst, n in sorted(calls.items())]
    alerts = [r["name"] for g in get(f"{base}/api/v1/rules")["groups"] for r in g["rules"] if r["type"] == "alerting"]
    lines.append(f"alert rules loaded: {len(alerts)} ({', '.join(alerts)})")
    ok = (len(alerts) > 0 and jobs.count("moe-gateway") == 1 and jobs.count("moe-expert-server") == experts
          and len(targets) == experts + 1 and served >= forwards and len(tokens) == experts)
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    """Poll until the cluster looks right or time runs out; print the last look."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument("--experts", type=int, default=3, help="expert servers expected")
    p.add_argument("--forwards", type=int, default=1, help="Forward calls the gateway must have answered OK")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to keep polling")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    lines: list[str] = ["no answer from Prometheus"]
    while True:
        try:
            ok, lines = check(args.url.rstrip("/"), args.experts, args.forwards)
        except (OSError, RuntimeError, KeyError) as err:
            ok, lines = False, [f"Prometheus: {err}"]
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(2)
    print("\n".join(lines))
    print("OK: Prometheus scraped every service" if ok else f"FAILED after {args.timeout:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
