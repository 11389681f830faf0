"""AdminService: load and drop experts while serving, per-expert load, the change lock; authenticated.

A caller proves itself with the admin bearer token (--admin-token-file) or a client certificate the
server verified (mutual TLS, --require-client-cert). With neither configured the service refuses every
call: it is never open by default.
"""

from __future__ import annotations

import asyncio
import hmac

import grpc

from moe_client.ownership import from_messages, to_messages
from moe_client.pb import admin_pb2, admin_pb2_grpc
from moe_client.security import AUTH_METADATA
from moe_serve.expert_server.live_placement import LivePlacement
from moe_serve.observability.collectors import ExpertTokenCounter
from moe_serve.rpc.errors import PermissionDenied, Unauthenticated
from moe_serve.rpc.server import rpc

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


class AdminAuth:
    """Who may call AdminService: holders of `token`, or (with `mutual_tls`) any verified client certificate."""

    def __init__(self, token: str | None, mutual_tls: bool):
        self.expected = f"Bearer {token}".encode() if token else None
        self.mutual_tls = mutual_tls

    def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.mutual_tls and context.peer_identities():
            return
        if self.expected is None:
            if self.mutual_tls:
                raise Unauthenticated("admin RPCs need a client certificate signed by the server's --tls-ca")
            raise PermissionDenied("admin RPCs are off on this server: start it with --admin-token-file or with "
                                   "mutual TLS (--tls-ca, --require-client-cert)")
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_METADATA:
                given = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self.expected):
                    return
        raise Unauthenticated(f"admin RPCs need the admin token (metadata '{AUTH_METADATA}: Bearer ...')")


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Thin: authenticate, decode, call LivePlacement, encode."""

    def __init__(self, live: LivePlacement, auth: AdminAuth, tokens: ExpertTokenCounter, name: str = ""):
        self.live = live
        self.auth = auth
        self.tokens = tokens
        self.name = name

    @rpc
    async def LoadExperts(self, request, context):
        self.auth.check(context)
        seconds = await self.live.load(from_messages(request.experts), request.device, request.lock_holder)
        return admin_pb2.LoadExpertsResponse(placement_version=self.live.version, load_seconds=seconds,
                                             owned=to_messages(self.live.bank.owned))

    @rpc
    async def DropExperts(self, request, context):
        self.auth.check(context)
        seconds = await self.live.drop(from_messages(request.experts), request.lock_holder, request.drain_seconds)
        return admin_pb2.DropExpertsResponse(placement_version=self.live.version, drain_seconds=seconds,
                                             owned=to_messages(self.live.bank.owned))

    @rpc
    async def GetExpertLoad(self, request, context):
        self.auth.check(context)
        used = self.live.used()
        counts = await asyncio.to_thread(self.tokens.counts)  # waits for the bank's computation in progress
        return admin_pb2.GetExpertLoadResponse(
            server_name=self.name, placement_version=self.live.version, expert_bytes=self.live.expert_bytes,
            experts=[admin_pb2.ExpertLoad(layer=layer, expert=expert, tokens=n)
                     for (layer, expert), n in sorted(counts.items())],
            devices=[admin_pb2.DeviceCapacity(device=d, capacity_bytes=c, used_bytes=used[d])
                     for d, c in self.live.capacity.items()])

    @rpc
    async def AcquireChangeLock(self, request, context):
        self.auth.check(context)
        self.live.acquire(request.holder, request.ttl_seconds)
        return admin_pb2.AcquireChangeLockResponse()

    @rpc
    async def ReleaseChangeLock(self, request, context):
        self.auth.check(context)
        self.live.release(request.holder)
        return admin_pb2.ReleaseChangeLockResponse()
