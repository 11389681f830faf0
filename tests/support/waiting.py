"""Waiting for a condition, and for a server to answer SERVING."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import grpc

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns a true value, and return that value.

    A gRPC error from the predicate counts as "not yet" (a server still starting, a link still down);
    any other exception propagates. After `timeout` seconds: TimeoutError naming `what` and the last
    gRPC error seen.
    """
    deadline = time.monotonic() + timeout
    last = "none"
    while True:
        try:
            value = predicate()
            if value:
                return value
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s (last gRPC error: {last})")
        time.sleep(interval)


def wait_serving(address: str, timeout: float = 120.0, check: Callable[[], object] | None = None,
                 interval: float = 0.05) -> None:
    """Block until the server at `address` says SERVING through grpc.health.v1 (every moe-serve server
    answers it); `check()` runs before each probe and may raise to give up early (a process that died)."""
    from moe_client import ExpertClient

    with ExpertClient(address, timeout=2) as client:
        def serving() -> bool:
            if check is not None:
                check()
            return client.health() == "SERVING"

        wait_for(serving, f"{address} SERVING", timeout, interval)
