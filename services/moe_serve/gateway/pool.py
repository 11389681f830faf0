"""The expert servers behind a gateway: membership, health, ownership and outstanding work.

Each `--servers` entry is resolved to addresses (a DNS name may give several, as a Kubernetes
headless service does) and re-resolved periodically: new addresses join, vanished ones leave. Each
address is a Replica with its own channel and a watcher that fetches GetInfo and then follows
grpc.health.v1 Watch, so a server that stops, restarts (maybe on other experts or another
checkpoint) or loses its network leaves the routing and comes back by itself. A call that fails
ejects its replica for a while (doubling per failure) so requests stop trying it before the watcher
notices. The pool lives on the gateway's event loop; nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2

from moe_client.channel import open_aio_channel
from moe_client.ownership import format_ranges
from moe_client.pb import experts_pb2
from moe_serve.core.spec import ModelSpec
from moe_serve.gateway.replica import PoolOptions, Replica
from moe_serve.gateway.resolve import resolve
from moe_serve.rpc import shared_regions
from moe_serve.rpc.side_channel import ChannelError, SideLink

__all__ = ["PoolOptions", "Replica", "ServerPool", "StartupError"]

log = logging.getLogger(__name__)
EXPERT_SERVICE = experts_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
EJECT_BASE, EJECT_MAX = 0.5, 10.0  # seconds a failed replica is skipped: 0.5, 1, 2, ... 10
WATCH_BACKOFF = (0.1, 2.0)  # seconds between watcher reconnects, doubling
WAIT_LOG_EVERY = 3.0  # seconds between start-up lines naming the servers the gateway still waits for
TCP_LINK_RETRY = 30.0  # seconds before connecting again to a TCP side channel that could not be reached


def _waiting_for(replicas: list[Replica]) -> str:
    return "; ".join(f"{r.name} ({r.error or 'no answer yet'})" if r.name != r.address else
                     f"{r.address} ({r.error or 'no answer yet'})" for r in replicas)


class StartupError(RuntimeError):
    """The gateway cannot serve with the expert servers it found; the message says why."""


class ServerPool:
    """Expert server replicas of one gateway, kept current by resolution and health watching."""

    def __init__(self, targets: list[str], spec: ModelSpec, fingerprint: str, options: PoolOptions | None = None):
        self.targets = list(targets)
        self.spec = spec
        self.fingerprint = fingerprint
        self.options = options or PoolOptions()
        self.replicas: dict[str, Replica] = {}  # address -> replica, in join order
        self.owners: dict[int, dict[int, list[Replica]]] = {}  # layer -> expert -> replicas owning it
        self._owners_version = 0  # bumped whenever `owners` is rebuilt (sole_plan's cache key)
        self._sole_plans: dict[int, tuple[tuple, dict[Replica, list[int]] | None]] = {}
        self.on_change: Callable[[], None] | None = None  # membership or ownership changed
        self._tasks: set[asyncio.Task] = set()  # watchers, the resolver, channels being retired
        self._refreshing: asyncio.Task | None = None  # GetInfo of every server after a placement change
        self._refresh_again = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def members(self) -> list[Replica]:
        """Every replica in the pool, usable or not, in join order."""
        return list(self.replicas.values())

    def live(self) -> list[Replica]:
        """Replicas that calls may go to now."""
        now = time.monotonic()
        return [r for r in self.replicas.values() if r.routable(now)]

    # --- start and stop -------------------------------------------------------------------------

    async def start(self, connect_timeout: float) -> None:
        """Resolve the targets and fetch every server's info, waiting for servers still starting.

        While some do not answer, their names and last errors are logged every WAIT_LOG_EVERY seconds;
        once the servers that answered cover every (layer, expert), the gateway starts without the rest
        (their watchers add them when they answer). StartupError names a server on another checkpoint,
        or, after `connect_timeout`, the (layer, expert) pairs nobody covers and why each silent server
        is silent (its last error: a TLS failure shows as one, not as a timeout).
        """
        deadline = time.monotonic() + connect_timeout
        self._loop = asyncio.get_running_loop()
        try:
            for target in self.targets:
                for address, host in (await self._resolve_waiting(target, deadline)).items():
                    self._add(address, target, host)
            await self._first_infos(connect_timeout, deadline)
        except BaseException:
            await self.close()
            raise
        for replica in self.members:
            replica.watcher = self._spawn(self._watch(replica))
        self._spawn(self._resolve_loop())
        self._spawn(self._info_loop())

    async def _first_infos(self, connect_timeout: float, deadline: float) -> None:
        tasks = {r: asyncio.ensure_future(self._first_info(r, deadline)) for r in self.members}
        next_log = time.monotonic() + WAIT_LOG_EVERY
        try:
            while True:
                answered = [r for r, t in tasks.items() if t.done() and t.result()]
                for replica in answered:
                    if replica.refused:
                        raise StartupError(f"expert server {replica.name} ({replica.address}) {replica.refused}; "
                                           "start every service on the same checkpoint")
                silent = [r for r in tasks if r not in answered]
                missing = self.uncovered()
                if not missing:
                    if silent:
                        log.warning("starting without expert server(s) %s: their experts are covered by the "
                                    "others; they join when they answer", _waiting_for(silent))
                    return
                if not silent or time.monotonic() >= deadline:
                    why = f"; not answering within {connect_timeout:.0f}s: {_waiting_for(silent)}" if silent else ""
                    raise StartupError("no expert server owns " + "; ".join(missing) + " (servers: "
                                       + (", ".join(r.name for r in self.members) or "none") + ")" + why)
                if time.monotonic() >= next_log:
                    log.warning("waiting for expert server(s) %s; uncovered: %s", _waiting_for(silent),
                                "; ".join(missing))
                    next_log += WAIT_LOG_EVERY
                pending = [t for t in tasks.values() if not t.done()]
                if pending:
                    await asyncio.wait(pending, timeout=max(0.05, min(next_log, deadline) - time.monotonic()),
                                       return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _resolve_waiting(self, target: str, deadline: float) -> dict[str, str]:
        while True:
            try:
                return await resolve(target)
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise StartupError(str(err)) from err
                await asyncio.sleep(0.5)

    async def _first_info(self, replica: Replica, deadline: float) -> bool:
        """GetInfo until it answers (True) or the deadline passes (False); each failure (connection refused,
        a TLS handshake) is kept in replica.error. Not wait_for_ready: that turned every failure into
        DEADLINE_EXCEEDED, hiding a TLS error's text."""
        while True:
            left = deadline - time.monotonic()
            try:
                info = await replica.stub.GetInfo(experts_pb2.GetInfoRequest(), timeout=max(0.5, min(5.0, left)))
                self._set_info(replica, info)
                replica.serving = not replica.refused  # the watcher confirms within moments
                return True
            except grpc.aio.AioRpcError as err:
                replica.error = f"{err.code().name}: {err.details()}" + self._tls_hint(err)
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.2)

    def _tls_hint(self, err: grpc.aio.AioRpcError) -> str:
        """What a failed connection over TLS most likely means: a server that requires a client certificate
        ends the handshake without a word, which grpc reports as 'Socket closed'."""
        if self.options.tls is None or err.code() != grpc.StatusCode.UNAVAILABLE:
            return ""
        text = err.details() or ""
        if "Socket closed" in text or "Connection reset" in text:
            mine = "this gateway sends none" if not self.options.tls.cert else "it refused this gateway's"
            return (f" [TLS handshake refused by the server: it likely requires a client certificate signed by its "
                    f"--tls-ca, and {mine} (--expert-tls-cert, --expert-tls-key)]")
        return ""

    async def close(self) -> None:
        """Stop watching and resolving, and close every channel."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self.replicas.values()), return_exceptions=True)
        for replica in self.replicas.values():
            self._link(replica, "")
        self.replicas.clear()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- membership -----------------------------------------------------------------------------

    def _add(self, address: str, target: str, host: str) -> Replica:
        options = self.options
        name = host if options.tls is not None and host else None
        channel = open_aio_channel(address, options.tls, extra=options.channel_options(), server_name=name)
        # Lanes connect on their first call (grpc channels are lazy): none for servers reached by shared memory.
        lanes = tuple(open_aio_channel(address, options.tls, extra=options.lane_options(), server_name=name)
                      for _ in range(options.tcp_lanes - 1))
        replica = self.replicas[address] = Replica(address, target, channel, lanes, options.min_piece_bytes,
                                                       options.pieces_per_lane)
        return replica

    async def refresh(self) -> None:
        """Resolve every target once more: new addresses join, vanished ones leave."""
        wanted: dict[str, tuple[str, str]] = {}
        for target in self.targets:
            try:
                found = await resolve(target)
            except OSError as err:  # a DNS hiccup must not empty the pool: keep what we have
                log.warning("re-resolving %s: %s; keeping its %d server(s)", target, err,
                            sum(r.target == target for r in self.replicas.values()))
                wanted.update({a: (target, "") for a, r in self.replicas.items() if r.target == target})
                continue
            wanted.update({address: (target, host) for address, host in found.items()})
        for address, (target, host) in wanted.items():
            if address not in self.replicas:
                log.info("expert server %s (from %s) joins; fetching its info", address, target)
                replica = self._add(address, target, host)
                replica.watcher = self._spawn(self._watch(replica))
        for address in [a for a in self.replicas if a not in wanted]:
            self._leave(self.replicas[address])

    def _leave(self, replica: Replica) -> None:
        log.warning("expert server %s (%s) left the server list", replica.name, replica.address)
        del self.replicas[replica.address]
        self._reindex()
        if replica.watcher is not None:
            replica.watcher.cancel()
        self._spawn(self._retire(replica))

    async def _retire(self, replica: Replica) -> None:
        deadline = time.monotonic() + self.options.rpc_timeout
        while replica.outstanding and time.monotonic() < deadline:  # let its in-flight calls finish
            await asyncio.sleep(0.1)
        await replica.close()
        self._link(replica, "")

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.resolve_interval)
            try:
                await self.refresh()
            except Exception:  # the loop must survive anything and try again
                log.exception("re-resolving expert servers failed")

    # --- health ---------------------------------------------------------------------------------

    def _set_info(self, replica: Replica, info: experts_pb2.GetInfoResponse) -> None:
        replica.info = info
        replica.owns = {le.layer: frozenset(le.experts) for le in info.owned}
        # Same host: the tensors may skip the socket (shared_regions.py), in the kinds the server maps.
        same_host = info.host_id == shared_regions.host_id()
        replica.shared_kinds = frozenset(info.shared_kinds) if same_host else frozenset()
        replica.gpu_uuids = frozenset(info.gpu_uuids)
        replica.routed_calls = info.routed_calls
        replica.done_signals = info.done_signals
        self._link(replica, *self._side_address(replica, info, same_host))
        refused = ""
        if info.model_fingerprint != self.fingerprint:
            refused = (f"serves checkpoint {info.model_fingerprint} ({info.model_type}), "
                       f"the gateway's is {self.fingerprint} ({self.spec.model_type})")
        if refused and refused != replica.refused:
            log.error("expert server %s (%s) %s; not using it", replica.name, replica.address, refused)
        replica.refused = refused
        self._reindex()

    def _side_address(self, replica: Replica, info: experts_pb2.GetInfoResponse, same_host: bool) -> tuple[str, bool]:
        """(address, is TCP) of the side channel to use for `replica`, ("", False) for none. Same host with shared
        memory: its Unix socket (tensors in shared memory); otherwise its TCP port, on its address's host. Never
        beside TLS: the side channel is not encrypted."""
        if self.options.tls is not None:
            return "", False
        if same_host and replica.shared_kinds and self.options.shared_memory:
            return (info.local_address if self.options.local_calls else ""), False
        host = replica.address.rpartition(":")[0]
        if not self.options.tcp_calls or not info.tcp_channel_port or not host or replica.address.startswith("unix:"):
            return "", False
        return f"{host}:{info.tcp_channel_port}", True

    def _link(self, replica: Replica, address: str, tcp: bool = False) -> None:
        """Open (or reopen, after a restart) the side channel to `address`; "" closes it. A TCP connection is made
        off the event loop (a host that drops packets would hold it for seconds); calls go by gRPC meanwhile."""
        current = replica.side_link()
        if current is not None and current.address == address:
            return
        if current is not None:
            current.close()
        for lane in replica.lanes:
            lane.close()
        replica.side, replica.lanes = None, ()
        if not address or address == replica.linking:
            return
        if tcp:
            failed, retry_at = replica.unreachable
            if address == failed and time.monotonic() < retry_at:
                return  # a firewall that drops the port: not one connect timeout per info poll
            replica.linking = address
            self._spawn(self._open_tcp(replica, address))
            return
        try:
            replica.side = SideLink(address, timeout=min(self.options.rpc_timeout, 5.0),
                                    max_bytes=self.options.max_message_bytes)
            log.info("expert server %s (%s): RunExperts over the same-host channel", replica.name, replica.address)
        except (OSError, ChannelError) as err:  # another network namespace, another user: gRPC it is
            log.info("expert server %s (%s): no same-host channel (%s); calls go by gRPC", replica.name,
                     replica.address, err)

    async def _open_tcp(self, replica: Replica, address: str) -> None:
        def connect() -> list[SideLink]:  # --tcp-lanes connections: large calls are split by rows over them
            links: list[SideLink] = []
            try:
                for _ in range(self.options.tcp_lanes):
                    links.append(SideLink(address, timeout=min(self.options.rpc_timeout, 5.0),
                                          max_bytes=self.options.max_message_bytes, tcp=True,
                                          keepalive=self.options.keepalive))
            except BaseException:
                for link in links:
                    link.close()
                raise
            return links

        try:
            links = await asyncio.to_thread(connect)
        except (OSError, ChannelError) as err:  # a firewall, a server that stopped: gRPC it is
            replica.unreachable = (address, time.monotonic() + TCP_LINK_RETRY)
            log.info("expert server %s (%s): no TCP side channel at %s (%s); calls go by gRPC (next try in %.0fs)",
                     replica.name, replica.address, address, err, TCP_LINK_RETRY)
            return
        finally:
            if replica.linking == address:
                replica.linking = ""
        if replica.side_link() is not None or self.replicas.get(replica.address) is not replica:
            for link in links:  # another link came first, or the replica left the pool meanwhile
                link.close()
            return
        replica.side, replica.lanes = links[0], tuple(links[1:])
        log.info("expert server %s (%s): RunExperts over the TCP side channel %s", replica.name, replica.address,
                 address)

    def _set_serving(self, replica: Replica, serving: bool, reason: str = "") -> None:
        if serving != replica.serving:
            if serving:
                log.info("expert server %s (%s) is SERVING", replica.name, replica.address)
            else:
                log.warning("expert server %s (%s) is down: %s", replica.name, replica.address, reason)
        replica.serving = serving
        if reason:
            replica.error = reason
        if self.on_change is not None:
            self.on_change()

    async def _watch(self, replica: Replica) -> None:
        """GetInfo (the server may have restarted with other experts), then follow its health."""
        delay = WATCH_BACKOFF[0]
        probe = min(self.options.rpc_timeout, 5.0)
        request = health_pb2.HealthCheckRequest(service=EXPERT_SERVICE)
        while True:
            try:
                self._set_info(replica, await replica.stub.GetInfo(experts_pb2.GetInfoRequest(), timeout=probe))
                if not replica.refused:
                    fresh = True
                    async for reply in replica.health.Watch(request):
                        if fresh and reply.status == SERVING:  # a new connection: forget old call failures
                            replica.failures, replica.ejected_until, fresh = 0, 0.0, False
                        self._set_serving(replica, reply.status == SERVING,
                                          "" if reply.status == SERVING else "health: NOT_SERVING")
                        delay = WATCH_BACKOFF[0]
                    self._set_serving(replica, False, "health stream ended")
                else:
                    self._set_serving(replica, False)
            except grpc.aio.AioRpcError as err:
                self._set_serving(replica, False, f"{err.code().name}: {err.details()}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF[1])

    # --- routing --------------------------------------------------------------------------------

    def _reindex(self) -> None:
        owners: dict[int, dict[int, list[Replica]]] = {}
        for replica in self.replicas.values():
            for layer, experts in replica.owns.items():
                for expert in experts:
                    owners.setdefault(layer, {}).setdefault(expert, []).append(replica)
        self.owners = owners
        self._owners_version += 1
        if self.on_change is not None:
            self.on_change()

    def uncovered(self) -> list[str]:
        """'layer L: experts a-b' for every (layer, expert) of the model no usable replica owns."""
        missing = []
        for layer in self.spec.moe_layers:
            by_expert = self.owners.get(layer, {})
            lacking = [e for e in range(self.spec.num_experts)
                       if not any(not r.refused for r in by_expert.get(e, ()))]
            if lacking:
                missing.append(f"layer {layer}: experts {format_ranges(lacking)}")
        return missing

    def assign(self, layer: int, counts: dict[int, int],
               excluded: frozenset[str] = frozenset()) -> tuple[dict[Replica, list[int]], list[int]]:
        """Give each expert (with its slot count) to the usable replica with the least outstanding work,
        among equals the one with the least recent work.

        Work planned in this very call counts as outstanding, so one layer's experts spread over the
        replicas; returns the plan and the experts no serving replica owns.
        """
        now = time.monotonic()
        by_expert = self.owners.get(layer, {})
        plan: dict[Replica, list[int]] = {}
        load: dict[Replica, int] = {}
        missing: list[int] = []
        for expert, slots in sorted(counts.items(), key=lambda kv: -kv[1]):
            owners = [r for r in by_expert.get(expert, ()) if r.address not in excluded and r.serving and not r.refused]
            # A replica skipped after a failed call is still tried when it is the only one left
            # (a skip is a preference; a server that is down or refused is never tried).
            candidates = [r for r in owners if now >= r.ejected_until] or owners
            if not candidates:
                missing.append(expert)
                continue
            # Ties (no work in flight, as between decode steps) go to the replica that did the least work
            # lately: over time every replica of an expert gets its share, as `moe-serve plan` assumes.
            best = min(candidates, key=lambda r: (r.outstanding + load.get(r, 0), r.recent_load(now)))
            plan.setdefault(best, []).append(expert)
            load[best] = load.get(best, 0) + slots
        for replica, work in load.items():
            replica.add_work(work, now)
        return plan, sorted(missing)

    def sole_plan(self, layer: int) -> dict[Replica, list[int]] | None:
        """Every expert of `layer` given to its one serving replica, when each has exactly one (nothing to choose:
        the plan stays the same, cached, until ownership or a replica's state changes); else None (assign)."""
        key = (self._owners_version, tuple((r.address, r.serving, bool(r.refused)) for r in self.members))
        cached = self._sole_plans.get(layer)
        if cached is not None and cached[0] == key:
            return cached[1]
        by_expert = self.owners.get(layer, {})
        plan: dict[Replica, list[int]] | None = {}
        for expert in range(self.spec.num_experts):
            owners = [r for r in by_expert.get(expert, ()) if r.serving and not r.refused]
            if len(owners) != 1:
                plan = None
                break
            plan.setdefault(owners[0], []).append(expert)
        self._sole_plans[layer] = (key, plan)
        return plan

    def explain(self, layer: int, experts: list[int]) -> tuple[str, bool]:
        """Why no replica can run these experts; and whether every owner was refused for its checkpoint."""
        now = time.monotonic()
        by_expert = self.owners.get(layer, {})
        owners = list(dict.fromkeys(r for e in experts for r in by_expert.get(e, ())))
        if not owners:
            return "no expert server in the pool owns them", False
        text = "; ".join(f"{r.name} ({r.address}) {r.state(now)}" for r in owners)
        return text, all(r.refused for r in owners)

    def report_failure(self, replica: Replica, reason: str, eject: bool = True) -> None:
        """A call to `replica` failed: remember why, and skip it for a while if `eject`.

        NOT_FOUND means the server no longer holds an expert (a live drop this gateway has not seen yet):
        not a fault of the server, so its info is fetched again instead of ejecting it."""
        replica.error = reason
        if reason.startswith("NOT_FOUND"):
            self.refresh_placement()
            return
        if eject and time.monotonic() >= replica.ejected_until:  # calls failing together count once
            replica.failures += 1
            pause = min(EJECT_MAX, EJECT_BASE * 2 ** (replica.failures - 1))
            replica.ejected_until = time.monotonic() + pause
            log.warning("expert server %s (%s): %s; skipping it for %.1fs", replica.name, replica.address,
                        reason, pause)

    def report_success(self, replica: Replica, placement_version: int = 0) -> None:
        """A call to `replica` succeeded: its failure count starts over; a placement version other than
        the one its info has means it loaded or is dropping experts, and every server's info is fetched."""
        if replica.failures:
            replica.failures = 0
        if placement_version and placement_version != replica.info.placement_version and self._loop is not None:
            self._loop.call_soon_threadsafe(self.refresh_placement)  # same-host calls answer on the model thread

    # --- live placement changes -----------------------------------------------------------------

    def refresh_placement(self) -> None:
        """Fetch every server's GetInfo again, soon, and apply them together (at most one fetch at a time;
        a request meanwhile makes one more)."""
        if self._refreshing is not None and not self._refreshing.done():
            self._refresh_again = True
            return
        self._refreshing = self._spawn(self._refresh_all())

    async def placement_settled(self) -> None:
        """Wait for the info fetch under way, if any (errors stay with it)."""
        if self._refreshing is not None:
            await asyncio.wait([self._refreshing])

    async def _refresh_all(self) -> None:
        self._refresh_again = True
        while self._refresh_again:
            self._refresh_again = False
            members = [r for r in self.members if r.serving]
            timeout = min(self.options.rpc_timeout, 5.0)
            infos = await asyncio.gather(*(r.stub.GetInfo(experts_pb2.GetInfoRequest(), timeout=timeout)
                                           for r in members), return_exceptions=True)
            # All at once, with no await between: a replica that now holds an expert is known before
            # the one that is dropping it stops being routed to.
            for replica, info in zip(members, infos, strict=True):
                if isinstance(info, experts_pb2.GetInfoResponse) and replica.address in self.replicas:
                    if info.placement_version != replica.info.placement_version:
                        log.info("expert server %s (%s): placement version %d, owns %s", replica.name,
                                 replica.address, info.placement_version,
                                 "; ".join(f"{le.layer}:{format_ranges(le.experts)}" for le in info.owned))
                    self._set_info(replica, info)

    async def _info_loop(self) -> None:
        """Fetch infos every `info_interval` s too: a server no call goes to may have loaded experts."""
        while True:
            await asyncio.sleep(self.options.info_interval)
            self.refresh_placement()
