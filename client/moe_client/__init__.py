"""Light client for moe-serve: the tensor codec, a Python API and the `moe-client` CLI (no torch)."""

from moe_client.client import ExpertClient, GatewayClient, GeneratedToken
from moe_client.wire import WireError, decode, encode

__all__ = ["ExpertClient", "GatewayClient", "GeneratedToken", "WireError", "decode", "encode"]
