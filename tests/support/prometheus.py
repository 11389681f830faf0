"""A real Prometheus server (Debian's package) on loopback for tests, and queries through its HTTP API."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.launch import ServiceProcess
from tests.support.ports import free_port
from tests.support.waiting import wait_for


def require(binary: str, package: str = "prometheus") -> str:
    """Path of `binary` (from Debian's `package`); skip without it, except in CI (CI=1), where .ci/run
    installs it and it must run."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (apt-get install -y {package})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI installs it in .ci/run, so this test must run there")
        pytest.skip(message)
    return path


def render_config(gateway: list[str], experts: list[str], interval: str) -> str:
    """deploy/prometheus/render.py's rendering of the project's template for these targets."""
    spec = importlib.util.spec_from_file_location("render_prometheus", ROOT / "deploy" / "prometheus" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render(gateway, experts, interval)


class Prometheus:
    """`prometheus` on 127.0.0.1:<free port> with a config file and a scratch TSDB; stop() ends it."""

    def __init__(self, config: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ServiceProcess(
            [require("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], workdir / "prometheus.log").start()

    def _ready(self) -> bool:
        self.proc.check_running()
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until /-/ready answers 200."""
        try:
            wait_for(self._ready, "prometheus /-/ready", timeout, interval=0.2)
        except TimeoutError as err:
            raise TimeoutError(f"{err}: {self.proc.output()}") from None

    def query(self, expr: str) -> list[dict]:
        """Instant query through /api/v1/query; raises on an error answer."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as err:  # 400 for a bad expression: show Prometheus's reason
            raise AssertionError(f"query {expr!r}: {err.code} {err.read().decode()}") from err
        assert body["status"] == "success", body
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of `label` on the series `match` selects (Grafana's label_values(match, label))."""
        url = f"{self.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def values(self, expr: str, by: str | None = None) -> dict[str, float]:
        """Query result as {value of label `by` (or ''): float}."""
        return {(r["metric"].get(by, "") if by else ""): float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, expr: str, check, timeout: float = 30.0) -> dict[str, float]:
        """Poll `expr` (as values()) until check(values) is true; TimeoutError shows the last answer."""
        last: dict[str, float] = {}

        def passes() -> bool:
            last.clear()
            last.update(self.values(expr))
            return check(last)

        try:
            wait_for(passes, repr(expr), timeout, interval=0.3)
        except TimeoutError:
            raise TimeoutError(f"{expr!r} still {last} after {timeout:.0f}s") from None
        return dict(last)

    def targets(self) -> list[dict]:
        """The active scrape targets with their health."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as reply:
            return json.load(reply)["data"]["activeTargets"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        self.proc.stop(10)
