"""Network namespaces joined to this host by veth pairs, for fault tests (a link cut) and shaped-link
benchmarks (tc rate limits). Root only; every namespace and link is removed on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

AVAILABLE = os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("tc"))


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class NetNamespace:
    """A network namespace joined to this host by a veth pair; the link can be cut, restored and rate-shaped."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.ns_if = f"moe-{tag}", f"mh{tag}", f"mn{tag}"
        third, base = int(tag[:2], 16), int(tag[2:4], 16) % 63 * 4  # a /30 of 10.231.0.0/16
        self.host_ip, self.ns_ip = f"10.231.{third}.{base + 1}", f"10.231.{third}.{base + 2}"

    def _ip(self, *args: str) -> None:
        _run("ip", *args)

    def exec(self, *args: str) -> None:
        """Run a command inside the namespace."""
        _run("ip", "netns", "exec", self.name, *args)

    @property
    def wrapper(self) -> list[str]:
        """The prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def __enter__(self):
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._ip("link", "set", self.ns_if, "netns", self.name)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            for args in (("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if), ("link", "set", self.ns_if, "up"),
                         ("link", "set", "lo", "up")):
                self.exec("ip", *args)
        except BaseException:
            self.__exit__()
            raise
        return self

    def link(self, up: bool) -> None:
        """Cut (down) or restore (up) the host side of the veth."""
        self._ip("link", "set", self.host_if, "up" if up else "down")

    def shape(self, bits_per_second: float | None, bucket_seconds: float = 1e-3) -> None:
        """Limit both directions of the link to `bits_per_second` with a token bucket (None: no limit).

        The bucket holds `bucket_seconds` of the rate (at least 64 KiB, a GSO packet): a full bucket lets that many
        bytes pass at once, faster than the rate, which a real link does not."""
        for prefix, dev in (((), self.host_if), (tuple(self.wrapper), self.ns_if)):
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30,
                           check=False)
            if bits_per_second:
                burst = max(64 * 1024, int(bits_per_second / 8 * bucket_seconds))
                _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(bits_per_second)}bit",
                     "burst", str(burst), "latency", "50ms")

    def __exit__(self, *exc):
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30, check=False)
