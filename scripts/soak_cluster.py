"""Expert server replicas and a gateway as real processes on loopback (or in a network namespace),
restartable one by one: what the soak script and the fault tests run against."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from moe_client import GatewayClient


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
