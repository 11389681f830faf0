"""The HTTP front end (moe-openai) in tests and benchmarks: wait until it answers, read a Prometheus value."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from tests.support.launch import ServiceProcess


def wait_http(service: ServiceProcess, path: str = "/health", timeout: float = 120.0) -> str:
    """Block until GET http://ADDRESS{path} answers 200; returns the base URL. RuntimeError (with its log) if
    the process exits meanwhile, TimeoutError after `timeout` seconds."""
    base = f"http://{service.address}"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        service.check_running()
        try:
            with urllib.request.urlopen(base + path, timeout=2) as reply:
                if reply.status == 200:
                    return base
        except urllib.error.HTTPError as err:
            last = f"{err.code} {err.read()[:200]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.1)
    raise TimeoutError(f"{base}{path}: not 200 within {timeout:.0f}s (last: {last})\n{service.output()}")


def metric(url: str, name: str) -> float:
    """The value of one unlabelled series (or the sum of a labelled family's samples) at a /metrics URL."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name)] in " {"]
    if not values:
        raise KeyError(f"{name} not in {url}")
    return sum(values)
