"""Is a service's port free? Asked before any weights load, so a busy port is one line at once, not a
traceback after minutes of loading.

grpc binds with SO_REUSEPORT by default, which let a second server bind a port another one held: both
said ready and the kernel split the connections between them. Servers turn it off (server_options), and
this check, binding without SO_REUSEPORT, refuses a port that any socket listens on.
"""

from __future__ import annotations

import socket


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """OSError naming host and port when something listens there (or the address is not this host's)."""
    if host.startswith("unix:") or port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot bind {host}:{port}: {err.strerror}; check --host") from None
    for family, kind, proto, _, address in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == 98:  # EADDRINUSE
                    raise OSError(f"port {port} on {host} is already in use by another process; stop it or "
                                  f"choose another {flag}") from None
                raise OSError(f"cannot bind {host}:{port}: {err.strerror}; check --host") from None
