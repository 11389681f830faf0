"""Scatter a MoE layer's routed tokens to the expert servers that own their experts; gather the sums.

Legend: T = tokens, H = hidden size, K = top-k, E = experts per layer, S = servers.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field

import grpc
import torch

from moe_client import wire, zerocopy
from moe_client.channel import insecure_aio_channel, unary_callable
from moe_client.pb import experts_pb2, experts_pb2_grpc
from moe_serve.arch import ModelSpec
from moe_serve.errors import FailedPrecondition, ServiceError, Unavailable
from moe_serve.placement import Ownership, format_ranges
from moe_serve.tensors import from_wire, to_wire


@dataclass
class RemoteServer:
    """One expert server the gateway talks to."""

    address: str
    channel: grpc.aio.Channel
    stub: experts_pb2_grpc.ExpertServiceStub
    info: experts_pb2.ServerInfo = field(default_factory=experts_pb2.ServerInfo)

    @property
    def name(self) -> str:
        return self.info.server_name or self.address

    @property
    def owned(self) -> Ownership:
        return {le.layer: tuple(le.experts) for le in self.info.owned}


class StartupError(RuntimeError):
    """The gateway cannot serve with the expert servers it found; the message says why."""


async def connect(addresses: list[str], timeout: float) -> list[RemoteServer]:
    """Open channels and fetch every server's info, waiting up to `timeout` s for servers still starting."""

    async def one(address: str) -> RemoteServer:
        channel = insecure_aio_channel(address)
        stub = experts_pb2_grpc.ExpertServiceStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await stub.GetInfo(experts_pb2.GetInfoRequest(), timeout=max(0.5, min(5.0, deadline - time.monotonic())),
                                          wait_for_ready=True)
                return RemoteServer(address, channel, stub, info)
            except grpc.aio.AioRpcError as err:
                if time.monotonic() >= deadline:
                    await channel.close()
                    raise StartupError(f"expert server {address} did not answer GetInfo within {timeout:.0f}s "
                                       f"({err.code().name}: {err.details()})") from err
                await asyncio.sleep(0.2)

    return list(await asyncio.gather(*(one(a) for a in addresses)))


def ownership_table(spec: ModelSpec, servers: list[RemoteServer], fingerprint: str) -> dict[int, torch.Tensor]:
    """layer -> [E] index of the server that runs each expert; StartupError if any is unowned or mismatched."""
    for server in servers:
        if server.info.model_fingerprint != fingerprint:
            raise StartupError(
                f"expert server {server.name} ({server.address}) serves checkpoint {server.info.model_fingerprint} "
                f"({server.info.model_type}), the gateway's is {fingerprint} ({spec.model_type}); "
                "start every service on the same checkpoint"
            )
    table: dict[int, torch.Tensor] = {}
    missing: list[str] = []
    for layer in spec.moe_layers:
        owner = torch.full((spec.num_experts,), -1, dtype=torch.long)
        for index, server in enumerate(servers):
            for expert in server.owned.get(layer, ()):
                if owner[expert] < 0:  # first owner wins; replicas are for failover
                    owner[expert] = index
        lacking = (owner < 0).nonzero().squeeze(1).tolist()
        if lacking:
            missing.append(f"layer {layer}: experts {format_ranges(lacking)}")
        table[layer] = owner
    if missing:
        raise StartupError("no expert server owns " + "; ".join(missing)
                           + f" (servers: {', '.join(s.name for s in servers) or 'none'})")
    return table


class ExpertDispatcher:
    """ExpertBackend over gRPC: one concurrent RunExperts per server per layer, partial sums added."""

    def __init__(self, spec: ModelSpec, servers: list[RemoteServer], table: dict[int, torch.Tensor],
                 loop: asyncio.AbstractEventLoop, wire_dtype: int = wire.FLOAT32, timeout: float = 60.0):
        self.spec = spec
        self.servers = servers
        self.table = table
        self.loop = loop
        self.wire_dtype = wire_dtype
        self.timeout = timeout

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Blocking form for model code on a worker thread; the calls run on the gateway's event loop."""
        return asyncio.run_coroutine_threadsafe(self.run_async(layer, hidden, expert_ids, weights), self.loop).result()

    async def run_async(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, K], weights [T, K] -> [T, H] float32."""
        owner = self.table[layer][expert_ids]  # [T, K] server of each chosen expert
        calls, rows_of = [], []
        for index, server in enumerate(self.servers):
            mine = owner == index  # [T, K]
            rows = mine.any(dim=1).nonzero().squeeze(1)  # tokens with >= 1 expert here
            if rows.numel() == 0:
                continue
            ids = torch.where(mine, expert_ids, -1).index_select(0, rows).to(torch.int32)
            request = zerocopy.RunExpertsRequest(  # tensors travel as views of their bytes, copied once
                layer=layer,
                hidden=to_wire(hidden.index_select(0, rows), self.wire_dtype),
                expert_ids=to_wire(ids),
                weights=to_wire(weights.index_select(0, rows).float()),
            )
            calls.append(self._call(server, layer, ids, request))
            rows_of.append(rows)
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for rows, partial in zip(rows_of, await asyncio.gather(*calls)):
            out.index_add_(0, rows, partial)
        return out

    async def _call(self, server: RemoteServer, layer: int, ids: torch.Tensor,
                    request: experts_pb2.RunExpertsRequest) -> torch.Tensor:
        try:
            reply = await _run_experts(server.channel)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            experts = format_ranges(sorted(set(ids[ids >= 0].tolist())))
            where = f"expert server {server.name} ({server.address}), layer {layer}, experts {experts}"
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"{where}: {err.code().name}: {err.details()}") from err
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(f"{where}: {err.details()}") from err
            raise ServiceError(f"{where}: {err.code().name}: {err.details()}") from err
        return from_wire(reply.output, "output").float()


_RUN_EXPERTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run_experts(channel: grpc.aio.Channel):
    """RunExperts on `channel` through the zero-copy codec (the generated stub copies every tensor 4 times)."""
    call = _RUN_EXPERTS.get(channel)
    if call is None:
        call = _RUN_EXPERTS[channel] = unary_callable(channel, "/moe.v1.ExpertService/RunExperts",
                                                      zerocopy.RunExpertsResponse)
    return call
