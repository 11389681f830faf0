"""One expert server as the gateway sees it: its channel, what it owns, its health and its load."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from moe_client.channel import MAX_MESSAGE_BYTES
from moe_client.pb import experts_pb2, experts_pb2_grpc
from moe_client.security import TLSFiles
from moe_client.striping import DEFAULT_LANES, LANE_OPTIONS, MIN_PIECE_BYTES, Lanes
from moe_serve.rpc.side_channel import SideLink


@dataclass(frozen=True)
class PoolOptions:
    """How the gateway reaches and watches its expert servers."""

    rpc_timeout: float = 60.0  # deadline of each call to an expert server
    resolve_interval: float = 10.0  # seconds between re-resolutions of the server list
    info_interval: float = 2.0  # seconds between GetInfo polls (placement changes show in replies at once)
    keepalive: float = 10.0  # ping an idle connection this often; no answer within it marks the server down
    tls: TLSFiles | None = None  # TLS to the expert servers (cert + key: mutual TLS)
    max_message_bytes: int = MAX_MESSAGE_BYTES
    shared_memory: bool = True  # same-host servers that map it get tensors through shared memory (dispatch.py)
    # Same-host servers that offer it get RunExperts over a Unix socket from the model thread (side_dispatch.py),
    local_calls: bool = True
    # ... and servers whose tensors cannot go through shared memory (other hosts) over TCP, bytes in the frames.
    tcp_calls: bool = True
    tcp_lanes: int = DEFAULT_LANES  # connections per server; large calls are split by rows over them
    min_piece_bytes: int = MIN_PIECE_BYTES  # smallest piece of hidden states a call is split into
    pieces_per_lane: int = 1  # a split call's pieces per TCP side link, each link's sent in order (side_dispatch.py)

    def __post_init__(self) -> None:
        if self.tcp_lanes < 1:
            raise ValueError(f"--tcp-lanes {self.tcp_lanes} must be at least 1")
        if self.min_piece_bytes < 1:
            raise ValueError(f"--tcp-min-piece-bytes {self.min_piece_bytes} must be at least 1")
        if self.pieces_per_lane < 1:
            raise ValueError(f"--tcp-pieces-per-lane {self.pieces_per_lane} must be at least 1")

    def channel_options(self) -> list[tuple[str, int]]:
        """Keepalive and reconnect options of the channels to expert servers."""
        ms = max(100, int(self.keepalive * 1000))
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # grpc's default reconnect backoff grows to 2 minutes; a restarted server should rejoin in seconds.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

    def lane_options(self) -> list[tuple[str, int]]:
        """channel_options for the extra lanes: each its own connection."""
        return self.channel_options() + LANE_OPTIONS


RECENT_SECONDS = 5.0  # how long sent work counts toward a replica's recent load


class Replica:
    """One expert server address: its channel, what it owns, and what the pool knows of its health."""

    def __init__(self, address: str, target: str, channel: grpc.aio.Channel, lanes: tuple[grpc.aio.Channel, ...] = (),
                 min_piece_bytes: int = MIN_PIECE_BYTES, pieces_per_lane: int = 1):
        """`lanes`: more channels (own connections) to the same address, for large calls split by rows."""
        self.address = address
        self.target = target  # the --servers entry it was resolved from
        self.channel = channel
        self.stub = experts_pb2_grpc.ExpertServiceStub(channel)
        # RunExperts through the zero-copy codec (the generated stub copies every tensor 4 times), large calls
        # split over the lanes (moe_client.striping).
        self.run_experts = Lanes([channel, *lanes], min_piece_bytes)
        self.min_piece_bytes = min_piece_bytes  # the same split over the TCP side links (side_dispatch.py),
        self.pieces_per_lane = pieces_per_lane  # with this many pieces a link there, each link's sent in order
        self.health = health_pb2_grpc.HealthStub(channel)
        self.info = experts_pb2.GetInfoResponse()
        self.owns: dict[int, frozenset[int]] = {}
        self.serving = False
        self.refused = ""  # why the pool will not use it (another checkpoint), else ""
        self.error = ""  # the last failure seen
        self.failures = 0
        self.ejected_until = 0.0
        self.outstanding = 0  # (token, expert) slots in flight on this server
        self._recent = 0.0  # slots sent lately, decaying with RECENT_SECONDS
        self._recent_at = 0.0
        self.shared_kinds: frozenset[int] = frozenset()  # same-host fast paths it accepts (RegionKind values)
        self.gpu_uuids: frozenset[str] = frozenset()  # GPUs whose memory it can map
        self.routed_calls = False  # takes device-routed calls (routing left in shared memory)
        self.done_signals = False  # ... naming a word it sets when done (gateway/pipelined_calls.py)
        self.watcher: asyncio.Task | None = None
        self.side: SideLink | None = None  # its side channel (Unix socket on our host, else TCP), when open
        self.lanes: tuple[SideLink, ...] = ()  # more TCP side links, for large calls split by rows
        self.linking = ""  # the TCP side channel's address while a connection is being made
        self.unreachable: tuple[str, float] = ("", 0.0)  # a TCP side address that failed, and when to try again

    def recent_load(self, now: float) -> float:
        """(token, expert) slots sent here lately: each slot counts exp(-age / RECENT_SECONDS)."""
        return self._recent * math.exp(-(now - self._recent_at) / RECENT_SECONDS)

    def add_work(self, slots: int, now: float) -> None:
        self._recent = self.recent_load(now) + slots
        self._recent_at = now

    async def close(self) -> None:
        """Close its channels."""
        await self.run_experts.close()

    @property
    def name(self) -> str:
        return self.info.server_name or self.address

    @property
    def answered(self) -> bool:
        """Whether it has answered GetInfo (every answer names its checkpoint)."""
        return bool(self.info.model_fingerprint)

    @property
    def owned(self) -> dict[int, tuple[int, ...]]:
        return {layer: tuple(sorted(ids)) for layer, ids in sorted(self.owns.items())}

    def side_link(self) -> SideLink | None:
        """The side channel if it is open."""
        link = self.side
        return link if link is not None and not link.closed else None

    def side_lanes(self) -> list[SideLink]:
        """The open TCP side links, the main one first (large calls are split over them)."""
        return [link for link in (self.side, *self.lanes) if link is not None and not link.closed]

    def routable(self, now: float) -> bool:
        """True if calls may go here now."""
        return self.serving and not self.refused and now >= self.ejected_until

    def state(self, now: float) -> str:
        """Why this replica is or is not used, for error messages and logs."""
        if self.refused:
            return f"refused: {self.refused}"
        if not self.serving:
            return f"down ({self.error or 'not SERVING'})"
        if now < self.ejected_until:
            return f"skipped for {self.ejected_until - now:.1f}s after {self.error}"
        return "serving"
