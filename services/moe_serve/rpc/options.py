"""How a server meets its callers, shared by both services: TLS, client certificates, token, limits."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moe_client.security import TLSFiles
from moe_serve.process.env import env, env_flag


@dataclass(frozen=True)
class ServingOptions:
    """Transport security, authentication and limits of one server."""

    tls: TLSFiles | None = None  # serve TLS with tls.cert; tls.ca verifies client certificates
    require_client_cert: bool = False  # mutual TLS: only callers with a certificate signed by tls.ca
    auth_token: str | None = None  # callers must send `authorization: Bearer <token>`
    max_queue: int = 64  # heavy requests in flight (running or waiting); more is RESOURCE_EXHAUSTED
    max_message_bytes: int = 0  # larger messages are RESOURCE_EXHAUSTED; 0: derived from the model (message_limits)

    def __post_init__(self) -> None:
        if self.require_client_cert and (self.tls is None or not self.tls.ca or not self.tls.cert):
            raise ValueError("--require-client-cert needs --tls-cert, --tls-key and --tls-ca (the clients' CA)")
        if self.tls is not None and not self.tls.cert:
            raise ValueError("serving TLS needs --tls-cert and --tls-key (--tls-ca alone only verifies clients)")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue {self.max_queue} must be at least 1")
        if self.max_message_bytes and self.max_message_bytes < 1024:
            raise ValueError(f"--max-message-bytes {self.max_message_bytes} must be at least 1024 (or 0: derived "
                             "from the model)")

    def with_message_limit(self, derived: int) -> ServingOptions:
        """These options with the message limit set: the flag's value, or else `derived` from the model."""
        return dataclasses.replace(self, max_message_bytes=self.max_message_bytes or derived)


def add_serving_args(parser: argparse.ArgumentParser, max_queue: int, token: bool = False) -> None:
    """The TLS, auth and limit flags of a server; each default can come from MOE_<FLAG>."""
    g = parser.add_argument_group("security and limits")
    g.add_argument("--tls-cert", default=env("TLS_CERT"),
                   help="certificate chain (PEM) to serve TLS with; without it the port is plaintext "
                        "(env MOE_TLS_CERT)")
    g.add_argument("--tls-key", default=env("TLS_KEY"), help="private key (PEM) of --tls-cert (env MOE_TLS_KEY)")
    g.add_argument("--tls-ca", default=env("TLS_CA"),
                   help="CA certificate (PEM) that signs client certificates (env MOE_TLS_CA)")
    g.add_argument("--require-client-cert", action="store_true",
                   default=env_flag("REQUIRE_CLIENT_CERT", False),
                   help="mutual TLS: refuse callers without a certificate signed by --tls-ca "
                        "(env MOE_REQUIRE_CLIENT_CERT=1)")
    if token:
        g.add_argument("--auth-token", default=env("AUTH_TOKEN"),
                       help="require 'authorization: Bearer TOKEN' metadata on every call but health "
                            "(env MOE_AUTH_TOKEN; prefer --auth-token-file)")
        g.add_argument("--auth-token-file", default=env("AUTH_TOKEN_FILE"),
                       help="read the bearer token from this file (env MOE_AUTH_TOKEN_FILE)")
    g.add_argument("--max-queue", type=int, default=int(env("MAX_QUEUE", str(max_queue))),
                   help=f"requests in flight (running or waiting) before new ones get RESOURCE_EXHAUSTED "
                        f"(env MOE_MAX_QUEUE; default {max_queue})")
    g.add_argument("--max-message-bytes", type=int, default=int(env("MAX_MESSAGE_BYTES", "0")),
                   help="largest message received or sent; larger is RESOURCE_EXHAUSTED (env MOE_MAX_MESSAGE_BYTES; "
                        "default 0: what --max-tokens tokens of the model need, hidden size x 4 bytes each plus "
                        "their routing, plus 1 MiB)")


def serving_from_args(args: argparse.Namespace) -> ServingOptions:
    """Flags -> ServingOptions; ValueError names a missing file or a bad combination."""
    token = getattr(args, "auth_token", None)
    token_file = getattr(args, "auth_token_file", None)
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise ValueError(f"--auth-token-file {token_file}: {err.strerror or err}") from err
        if not token:
            raise ValueError(f"--auth-token-file {token_file} is empty")
    return ServingOptions(
        tls=TLSFiles.of(args.tls_ca, args.tls_cert, args.tls_key), require_client_cert=args.require_client_cert,
        auth_token=token or None, max_queue=args.max_queue, max_message_bytes=args.max_message_bytes,
    )
