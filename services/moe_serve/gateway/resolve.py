"""Turn a --servers entry into addresses: host:port, [v6]:port, unix:path, or a DNS name with several."""

from __future__ import annotations

import asyncio
import ipaddress
import socket


def split_target(target: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' -> (host, port); None for unix: targets."""
    if target.startswith("unix:"):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expert server address {target!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def resolve(target: str) -> dict[str, str]:
    """Addresses behind one --servers entry: {address: host name for TLS checks, or ''}.

    IPv4 first: 'localhost' would otherwise count one dual-stack server twice (127.0.0.1 and ::1).
    """
    parts = split_target(target)
    if parts is None or _is_ip(parts[0]):
        return {target: ""}
    host, port = parts
    loop = asyncio.get_running_loop()
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        if infos:
            fmt = "{}:{}" if family == socket.AF_INET else "[{}]:{}"
            return {fmt.format(info[4][0], port): host for info in sorted(infos)}
    raise OSError(f"expert server name {host!r} does not resolve")
