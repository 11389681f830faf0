"""Log lines of both services: timestamped, on stderr, each with the id of the request it belongs to."""

from __future__ import annotations

import logging

from moe_serve.rpc.request_ids import RequestIdFilter


def configure_logging(level: str = "INFO") -> None:
    """Timestamped logs to stderr, each line with the id of the request it belongs to ('-' for none)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    for noisy in ("asyncio", "grpc._cython"):  # at DEBUG they log every call's event loop, drowning ours
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
