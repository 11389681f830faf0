"""A failover scenario the in-process tests share: Forwards keep coming while one server stops."""

from __future__ import annotations

import numpy as np

from moe_client import GatewayClient
from tests.support.references import reference_forward


def forwards_while_one_stops(cluster, gateway: str, checkpoint, server: str, forwards: int, stop_before: int) -> None:
    """`forwards` Forwards of 16 fresh random tokens, `server` stopped (as a crash) before number `stop_before`;
    each must succeed and equal the reference."""
    rng = np.random.default_rng()
    with GatewayClient(gateway) as client:
        for i in range(forwards):
            if i == stop_before:
                cluster.stop_one(server)
            x = rng.standard_normal((16, 64), dtype=np.float32)
            assert np.abs(client.forward(x) - reference_forward(checkpoint, x)).max() <= 1e-5
