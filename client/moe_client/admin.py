"""Blocking client of an expert server's AdminService: live loads and drops, per-expert load, change lock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_client.client import _Client
from moe_client.ownership import Ownership, from_messages, to_messages
from moe_client.pb import admin_pb2, admin_pb2_grpc, experts_pb2, experts_pb2_grpc
from moe_client.security import TLSFiles


class AdminClient(_Client):
    """One expert server's AdminService (and its GetInfo); `token` is the server's admin token."""

    def __init__(self, address: str, timeout: float = 60.0, tls: TLSFiles | None = None, token: str | None = None):
        super().__init__(address, timeout, tls, token)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._experts = experts_pb2_grpc.ExpertServiceStub(self._channel)

    def info(self) -> experts_pb2.GetInfoResponse:
        """The server's GetInfo."""
        return self._experts.GetInfo(experts_pb2.GetInfoRequest(), timeout=self.timeout)

    def load(self, experts: Mapping[int, Sequence[int]], device: str = "",
             lock_holder: str = "") -> admin_pb2.LoadExpertsResponse:
        """Load experts (layer -> ids); returns once they serve."""
        return self._admin.LoadExperts(admin_pb2.LoadExpertsRequest(
            experts=to_messages(experts), device=device, lock_holder=lock_holder), timeout=self.timeout)

    def drop(self, experts: Mapping[int, Sequence[int]], lock_holder: str = "",
             drain_seconds: float = 0.0) -> admin_pb2.DropExpertsResponse:
        """Drop experts (layer -> ids); returns once calls for them have drained and their memory is freed."""
        return self._admin.DropExperts(admin_pb2.DropExpertsRequest(
            experts=to_messages(experts), lock_holder=lock_holder, drain_seconds=drain_seconds),
            timeout=self.timeout)

    def expert_load(self) -> admin_pb2.GetExpertLoadResponse:
        """Tokens per (layer, expert) since the server started, and each device's room."""
        return self._admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=self.timeout)

    def acquire_lock(self, holder: str, ttl_seconds: float = 0.0) -> None:
        """Take the server's change lock (ABORTED naming the holder if another has it)."""
        self._admin.AcquireChangeLock(admin_pb2.AcquireChangeLockRequest(holder=holder, ttl_seconds=ttl_seconds),
                                      timeout=self.timeout)

    def release_lock(self, holder: str) -> None:
        """Give the change lock back."""
        self._admin.ReleaseChangeLock(admin_pb2.ReleaseChangeLockRequest(holder=holder), timeout=self.timeout)

    def owned(self) -> Ownership:
        """What GetInfo lists now."""
        return from_messages(self.info().owned)
