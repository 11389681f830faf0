"""One RPC on a fresh channel, with the zero-copy codec: for tests that send hand-made requests."""

from __future__ import annotations

import grpc

from moe_client import zerocopy
from moe_client.channel import unary_callable


def run_experts(address: str, request, timeout: float = 10.0):
    """RunExperts `request` (a zerocopy or protobuf message) on the expert server at `address`; the reply."""
    channel = grpc.insecure_channel(address)
    try:
        return unary_callable(channel, "/moe.v1.ExpertService/RunExperts", zerocopy.RunExpertsResponse)(
            request, timeout=timeout)
    finally:
        channel.close()
