"""ExpertService: decode a RunExperts request, run the bank off the event loop, encode the reply."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from moe_client import wire, zerocopy
from moe_client.channel import add_servicer
from moe_client.pb import experts_pb2, experts_pb2_grpc
from moe_serve import __version__
from moe_serve.errors import FailedPrecondition, InvalidArgument
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.merger import CallMerger
from moe_serve.grpc_server import rpc
from moe_serve.metrics import ServiceMetrics
from moe_serve.tensors import TORCH_DTYPES, from_wire, to_wire_owned

_INT_IDS = (wire.INT32, wire.INT64)
_FLOAT = (wire.FLOAT32, wire.BFLOAT16, wire.FLOAT16, wire.FLOAT8_E4M3)


def decode_request(request, hidden_size: int):
    """Validated (hidden [T, H], expert_ids [T, K], weights [T, K]); InvalidArgument names the bad field."""
    hidden = from_wire(request.hidden, "hidden", _FLOAT)
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise InvalidArgument(f"hidden: shape {list(hidden.shape)} must be [tokens, {hidden_size}]")
    if hidden.shape[0] == 0:
        raise InvalidArgument("hidden: empty batch (0 tokens)")
    ids = from_wire(request.expert_ids, "expert_ids", _INT_IDS)
    weights = from_wire(request.weights, "weights", (wire.FLOAT32,))
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or ids.shape[1] == 0:
        raise InvalidArgument(f"expert_ids: shape {list(ids.shape)} must be [{hidden.shape[0]}, K] with K >= 1")
    if weights.shape != ids.shape:
        raise InvalidArgument(f"weights: shape {list(weights.shape)} differs from expert_ids {list(ids.shape)}")
    if not bool(torch.isfinite(weights).all()):
        raise InvalidArgument("weights: contains NaN or Inf")
    if not bool(torch.isfinite(hidden).all()):
        raise InvalidArgument("hidden: contains NaN or Inf")
    return hidden, ids, weights


class ExpertServicer(experts_pb2_grpc.ExpertServiceServicer):
    """Serves one ExpertBank; compute runs on a worker thread so health checks answer meanwhile."""

    def __init__(self, bank: ExpertBank, info: experts_pb2.ServerInfo, workers: int = 1,
                 metrics: ServiceMetrics | None = None, merge: bool = True):
        self.bank = bank
        self.info = info
        self.metrics = metrics or ServiceMetrics("expert_server")
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="experts")
        # Concurrent calls of a layer share one computation; the queue wait goes to the metrics.
        self.merger = CallMerger(bank, self.executor, merge, on_wait=self.metrics.queue_wait.observe)

    @rpc
    async def RunExperts(self, request, context):
        if request.model_fingerprint and request.model_fingerprint != self.info.model_fingerprint:
            raise FailedPrecondition(
                f"model_fingerprint: the caller serves checkpoint {request.model_fingerprint}, this server "
                f"({self.info.server_name}) serves {self.info.model_fingerprint}; start both on the same checkpoint")
        hidden, ids, weights = decode_request(request, self.bank.hidden_size)
        out_dtype = request.output_dtype or request.hidden.dtype
        if out_dtype not in _FLOAT:
            raise InvalidArgument(f"output_dtype: {wire.dtype_name(out_dtype)} is not a float wire dtype")
        self.bank.check(request.layer, ids)
        # Encoded on the worker thread, into bytes of the reply's own: the bank's result may be a view of a
        # buffer the next computation reuses, and plain to_wire would borrow those bytes (zero copy).
        # fp8 replies are quantised from float32 (the quantisation makes new buffers).
        output, seconds = await self.merger.run(request.layer, hidden, ids, weights,
                                                TORCH_DTYPES.get(out_dtype, torch.float32),
                                                lambda out: to_wire_owned(out, out_dtype))
        self.metrics.observe_batch("RunExperts", hidden.shape[0])
        self.metrics.observe_experts(request.layer, ids, seconds)
        return zerocopy.RunExpertsResponse(output=output, compute_seconds=seconds)

    @rpc
    async def GetInfo(self, request, context):
        return self.info


def add_to_server(servicer: ExpertServicer, server) -> None:
    """Register the servicer; RunExperts reads and writes its tensors without copying them (zerocopy)."""
    add_servicer(server, experts_pb2.DESCRIPTOR.services_by_name["ExpertService"], servicer)


def server_info(bank: ExpertBank, fingerprint: str, spec, name: str) -> experts_pb2.ServerInfo:
    """The ServerInfo a bank answers GetInfo with."""
    return experts_pb2.ServerInfo(
        model_fingerprint=fingerprint,
        model_type=spec.model_type,
        hidden_size=spec.hidden_size,
        num_experts=spec.num_experts,
        moe_layers=list(spec.moe_layers),
        owned=[experts_pb2.LayerExperts(layer=layer, experts=list(ids)) for layer, ids in bank.owned.items()],
        devices=bank.devices(),
        compute_dtype=str(bank.dtype).removeprefix("torch."),
        placement=[experts_pb2.ExpertPlacement(layer=p.layer, expert=p.expert, device=str(p.device))
                   for p in bank.placement()],
        server_version=__version__,
        server_name=name,
    )
