#!/usr/bin/env python3
"""Render prometheus.yml from prometheus.template.yml: the compose cluster's targets, or any given ones;
and the alert rules (alerts.rules.yml) as the Prometheus Operator's PrometheusRule for deploy/k8s.

    python3 deploy/prometheus/render.py            # rewrite prometheus.yml (compose) and the PrometheusRule
    python3 deploy/prometheus/render.py --check    # fail if either differs from its rendering
    python3 deploy/prometheus/render.py --gateway 10.0.0.1:9400 --experts 10.0.0.2:9400,10.0.0.3:9400 -o p.yml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "prometheus.template.yml"
OUTPUT = HERE / "prometheus.yml"
RULES = HERE / "alerts.rules.yml"
PROMETHEUS_RULE = HERE.parent / "k8s" / "monitoring" / "prometheus-rule.yaml"
# The compose cluster (deploy/docker-compose.yml): service names on its network, metrics on 9400.
COMPOSE_GATEWAY = ["gateway:9400"]
COMPOSE_EXPERTS = ["expert-0:9400", "expert-1:9400", "expert-2:9400"]
COMPOSE_INTERVAL = "5s"


def render(gateway: list[str], experts: list[str], interval: str = COMPOSE_INTERVAL) -> str:
    """The scrape config for these host:port targets, scraped every `interval` (e.g. '5s')."""
    if not gateway or not experts:
        raise ValueError("need at least one gateway target and one expert server target")
    return Template(TEMPLATE.read_text()).substitute(
        interval=interval, gateway_targets=json.dumps(gateway), expert_targets=json.dumps(experts))


def render_prometheus_rule(rules_text: str) -> str:
    """The rules file's groups as a PrometheusRule (monitoring.coreos.com/v1), the same text indented."""
    body = rules_text[rules_text.index("\ngroups:") + 1:]
    return ("# Rendered by deploy/prometheus/render.py from deploy/prometheus/alerts.rules.yml: edit that file.\n"
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: moe-serve\nspec:\n"
            + "".join(f"  {line}" if line.strip() else line for line in body.splitlines(keepends=True)))


def _write_or_check(path: Path, text: str, check: bool, source: str) -> bool:
    """Write `text` to `path`, or with `check` only say whether it is already there; False if it is not."""
    if not check:
        path.write_text(text)
        print(f"wrote {path}")
        return True
    if not path.is_file() or path.read_text() != text:
        print(f"{path} is not the rendering of {source}: run python3 {Path(__file__).name}", file=sys.stderr)
        return False
    print(f"{path}: up to date with {source}")
    return True


def main(argv: list[str] | None = None) -> int:
    """Write (or --check) a rendered prometheus.yml."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateway", default=",".join(COMPOSE_GATEWAY), help="comma-separated gateway metrics targets")
    p.add_argument("--experts", default=",".join(COMPOSE_EXPERTS), help="comma-separated expert server targets")
    p.add_argument("--interval", default=COMPOSE_INTERVAL, help="scrape interval (default %(default)s)")
    p.add_argument("-o", "--output", type=Path, default=OUTPUT, help="file to write (default: prometheus.yml)")
    p.add_argument("--check", action="store_true", help="only check that the output is up to date")
    args = p.parse_args(argv)
    text = render(args.gateway.split(","), args.experts.split(","), args.interval)
    ok = _write_or_check(args.output, text, args.check, TEMPLATE.name)
    if args.output == OUTPUT:  # the repository's own files: the PrometheusRule too
        ok &= _write_or_check(PROMETHEUS_RULE, render_prometheus_rule(RULES.read_text()), args.check, RULES.name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
