"""TLS credentials and bearer tokens for moe-serve: the one place certificate files are read.

Clients, the gateway (as a client of expert servers) and the servers (`moe_serve.rpc.server`) read their
PEM files here, named by flags, so every hop checks certificates the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

AUTH_METADATA = "authorization"  # gRPC metadata keys are lower case


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one side of a TLS connection: the CA it trusts, and its own certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError(f"TLS needs both a certificate and its key (got cert={self.cert!r}, key={self.key!r})")

    @property
    def enabled(self) -> bool:
        """True when any file is given, i.e. the connection uses TLS."""
        return bool(self.ca or self.cert)

    @classmethod
    def of(cls, ca: str | None, cert: str | None, key: str | None) -> TLSFiles | None:
        """TLSFiles when any path is given, else None (plaintext)."""
        files = cls(ca or None, cert or None, key or None)
        return files if files.enabled else None


def read_pem(path: str | None, what: str) -> bytes | None:
    """Bytes of a PEM file, or None without a path; ValueError naming the file otherwise."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{what} {path}: {err.strerror or err}") from err
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    """Client side: trust `tls.ca` (else the system roots) and present `tls.cert` when given (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca, "TLS CA"),
        private_key=read_pem(tls.key, "TLS key"),
        certificate_chain=read_pem(tls.cert, "TLS certificate"),
    )


def bearer(token: str) -> tuple[str, str]:
    """The metadata pair that carries `token`."""
    return AUTH_METADATA, f"Bearer {token}"


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a blocking channel."""

    def __init__(self, token: str):
        self.pair = bearer(token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _Details(details, [*(details.metadata or []), self.pair])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)
