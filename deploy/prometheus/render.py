#!/usr/bin/env python3
"""Render prometheus.yml from prometheus.template.yml: the compose cluster's targets, or any given ones.

    python3 deploy/prometheus/render.py            # rewrite deploy/prometheus/prometheus.yml (compose)
    python3 deploy/prometheus/render.py --check    # fail if it differs from the template's rendering
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
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            print(f"{args.output} is not the rendering of {TEMPLATE.name}: run python3 {Path(__file__).name}",
                  file=sys.stderr)
            return 1
        print(f"{args.output}: up to date with {TEMPLATE.name}")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
