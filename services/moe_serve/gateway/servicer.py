"""GatewayService: decode, run the engine off the event loop, encode."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from moe_client import wire, zerocopy
from moe_client.channel import add_servicer
from moe_client.pb import gateway_pb2, gateway_pb2_grpc
from moe_serve.errors import InvalidArgument, ResourceExhausted
from moe_serve.gateway.engine import GatewayEngine
from moe_serve.grpc_server import rpc
from moe_serve.tensors import from_wire, to_wire

_FLOAT = (wire.FLOAT32, wire.BFLOAT16, wire.FLOAT16, wire.FLOAT8_E4M3)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves Forward and GetModelInfo for one engine."""

    def __init__(self, engine: GatewayEngine, info: gateway_pb2.ModelInfo, max_tokens: int = 65536,
                 workers: int = 4):
        self.engine = engine
        self.info = info
        self.max_tokens = max_tokens
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gateway")

    def decode_hidden(self, msg) -> torch.Tensor:
        """Validated [..., H] hidden states; names the bad value."""
        hidden = from_wire(msg, "hidden", _FLOAT)
        h = self.engine.hidden_size
        if hidden.dim() < 1 or hidden.shape[-1] != h:
            raise InvalidArgument(f"hidden: shape {list(hidden.shape)} must end in the hidden size {h}")
        tokens = hidden.numel() // h
        if tokens == 0:
            raise InvalidArgument(f"hidden: empty batch (shape {list(hidden.shape)})")
        if tokens > self.max_tokens:
            raise ResourceExhausted(f"hidden: {tokens} tokens exceed the gateway's limit of {self.max_tokens}")
        if not bool(torch.isfinite(hidden).all()):
            raise InvalidArgument("hidden: contains NaN or Inf")
        return hidden

    @rpc
    async def Forward(self, request, context):
        hidden = self.decode_hidden(request.hidden)
        out_dtype = request.output_dtype or request.hidden.dtype
        if out_dtype not in _FLOAT:
            raise InvalidArgument(f"output_dtype: {wire.dtype_name(out_dtype)} is not a float wire dtype")
        loop = asyncio.get_running_loop()
        out, stats = await loop.run_in_executor(self.executor, self.engine.forward, hidden)
        return zerocopy.ForwardResponse(
            hidden=to_wire(out, out_dtype), total_seconds=stats.total_seconds, expert_seconds=stats.expert_seconds
        )

    @rpc
    async def GetModelInfo(self, request, context):
        return self.info


def add_to_server(servicer: GatewayServicer, server) -> None:
    """Register the servicer; Forward reads and writes its tensors without copying them (zerocopy)."""
    add_servicer(server, gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"], servicer)
