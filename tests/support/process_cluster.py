"""Expert server replicas and a gateway as real processes on loopback, restartable one by one: what the
soak script and the fault tests run against."""

from __future__ import annotations

import time
from pathlib import Path

from moe_client import GatewayClient
from tests.support.launch import ServiceProcess, launch, stop_all
from tests.support.waiting import wait_for


class ProcessCluster:
    """`replicas` expert servers, each owning every expert, and a gateway over them, all as processes
    (logs in `workdir`); start() starts them, stop() stops them."""

    def __init__(self, checkpoint: Path, workdir: Path, replicas: int = 2, gateway_args: tuple[str, ...] = (),
                 host: str = "127.0.0.1"):
        self.checkpoint = checkpoint
        self.experts = [launch("expert-server", workdir / f"expert{i}.log", start=False, checkpoint=checkpoint,
                               name=f"expert{i}", experts="all", host=host, grace=30, log_level="WARNING")
                        for i in range(replicas)]
        self.gateway = launch("gateway", workdir / "gateway.log", start=False, label="gateway", checkpoint=checkpoint,
                              servers=[s.address for s in self.experts], host=host, connect_timeout=120,
                              log_level="WARNING", args=gateway_args)
        self.address = self.gateway.address

    @property
    def services(self) -> list[ServiceProcess]:
        return [*self.experts, self.gateway]

    def start(self, timeout: float = 120.0) -> None:
        """Start every process and wait until the gateway is SERVING."""
        for svc in self.services:
            svc.start()
        self.gateway.wait_ready(timeout)

    def live_servers(self) -> list[str]:
        """Addresses of the expert servers the gateway routes to now."""
        with GatewayClient(self.address, timeout=5) as client:
            return [s.address for s in client.model_info().servers]

    def wait_listed(self, svc: ServiceProcess, timeout: float = 120.0) -> tuple[float, float]:
        """After a (re)start of `svc`: seconds until it is SERVING itself, then until the gateway lists it."""
        start = time.monotonic()
        svc.wait_ready(timeout)
        ready = time.monotonic()
        wait_for(lambda: svc.address in self.live_servers(), f"{svc.label} back in the gateway's server list",
                 max(0.0, timeout - (ready - start)))
        return ready - start, time.monotonic() - ready

    def rss(self) -> dict[str, float]:
        """RSS in MiB of each process."""
        return {svc.label: round(svc.rss_mib(), 1) for svc in self.services}

    def stop(self) -> dict[str, int]:
        """SIGTERM everything (gateway first), wait, and return exit statuses (SIGKILL whatever does not stop)."""
        started = [svc for svc in reversed(self.services) if svc.popen is not None]
        return dict(zip((svc.label for svc in started), stop_all(started, timeout=60), strict=True))
