"""Scatter a MoE layer's routed tokens to the expert servers that own their experts; gather the sums.

Which server runs which expert is the pool's choice (gateway/pool.py): the replica with the least
outstanding work. A sub-batch whose call fails or passes its deadline goes to another replica of
the same experts, within the request's deadline; with none left the layer fails with UNAVAILABLE
naming the (layer, expert) pairs.

A server on the gateway's host that maps shared memory gets the hidden states and writes its sums
through an arena (shared_regions.py): /dev/shm for dense layers on the CPU, the dense GPU's own memory
through CUDA IPC for dense layers on a GPU. Then no tensor bytes cross the socket or the host.

Legend: T = tokens, H = hidden size, K = top-k, E = experts per layer, S = servers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import grpc
import torch

from moe_client import striping, wire, zerocopy
from moe_client.ownership import format_ranges
from moe_serve.core.spec import ModelSpec
from moe_serve.gateway.call_budget import CallBudget
from moe_serve.gateway.call_outcome import FINAL, NO_EJECT, Failures, tried
from moe_serve.gateway.partial_sums import add_partials
from moe_serve.gateway.pipelined_calls import PendingCalls
from moe_serve.gateway.pool import Replica, ServerPool, StartupError
from moe_serve.gateway.routing_plan import expert_counts, rows_for, to_host
from moe_serve.gateway.side_dispatch import start_routed, start_side
from moe_serve.gateway.wire_choice import WireChoice
from moe_serve.observability.metrics import ServiceMetrics
from moe_serve.rpc import request_ids
from moe_serve.rpc.codec import TORCH_DTYPES, from_wire, to_wire
from moe_serve.rpc.deadlines import REQUEST_DEADLINE
from moe_serve.rpc.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, ServiceError, Unavailable
from moe_serve.rpc.gpu_events import GpuEvents
from moe_serve.rpc.shared_regions import CUDA, SHARED_DTYPES, Arena, ArenaPool, aligned, gpu_uuid, kind_for

__all__ = ["ExpertDispatcher", "StartupError"]

log = logging.getLogger(__name__)



class ExpertDispatcher:
    """ExpertBackend over gRPC: concurrent RunExperts per replica per layer, failover, partial sums added."""

    def __init__(self, spec: ModelSpec, pool: ServerPool, loop: asyncio.AbstractEventLoop,
                 wire_dtype: int = wire.FLOAT32, timeout: float = 60.0, metrics: ServiceMetrics | None = None,
                 arenas: ArenaPool | None = None, side_calls: bool = True, wire_choice: WireChoice | None = None,
                 device_routing: bool | None = None, pipelined_calls: bool = True):
        """`arenas`: shared memory for same-host servers that accept it (None: every byte goes by gRPC);
        `side_calls`: call servers over their side channel when they offer one (same host or TCP);
        `wire_choice`: wire dtypes per direction and call size for bytes in messages (default: `wire_dtype`);
        `device_routing`: same-host calls leave the routing in shared memory (side_dispatch.start_routed):
        None = for tensors on a GPU only (where it saves the host's waits), True = also on the host;
        `pipelined_calls`: device-routed calls on a GPU whose experts have one replica each are not waited for
        (pipelined_calls.py) when the servers and the GPU allow it."""
        self.spec = spec
        self.wire_choice = wire_choice or WireChoice(wire_dtype)
        self.pool = pool
        self.loop = loop
        self.wire_dtype = wire_dtype
        self.timeout = timeout
        self.metrics = metrics or ServiceMetrics("gateway")
        self.arenas = arenas
        self.budget = CallBudget(pool, timeout)  # per-attempt timeouts from observed latency (call_budget.py)
        self.side_calls = side_calls
        self.device_routing = device_routing
        self.events = GpuEvents()  # device-routed calls on a GPU: the servers wait on ours, we on theirs
        self.routed_rounds = 0  # layers called device-routed (tests and benchmarks read it)
        self.landed_calls = 0  # TCP calls whose outputs landed in one buffer of ours (side_dispatch; tests read it)
        # Device-routed rounds whose replies are read later (None: every reply is waited for)
        self.pending = (PendingCalls(max(spec.moe_layers, default=-1), first_layer=min(spec.moe_layers, default=-1))
                        if pipelined_calls else None)
        # Shared regions hold the hidden states in the wire dtype (bf16 for fp8, which only saves socket
        # bytes) and the sums in float32: no bytes to save there, and each server's partial sum rounded
        # to bf16 before they are added moved 2-server DeepSeek-shape logits by 2% of their norm.
        self.shared_dtype = wire_dtype if wire_dtype in SHARED_DTYPES else wire.BFLOAT16
        self.shared_out_dtype = wire.FLOAT32
        self._uuids: dict[torch.device, str] = {}

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Blocking form for model code on a worker thread; the calls run on the gateway's event loop."""
        return self.submit(layer, hidden, expert_ids, weights).result()

    def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
               weights: torch.Tensor) -> concurrent.futures.Future:
        """Start the layer's calls on the gateway's event loop and return at once (the caller computes the
        shared experts, or the other micro-batch, meanwhile); the future holds the [T, H] float32 sum."""
        deadline = REQUEST_DEADLINE.get()  # set by the edge interceptor, carried by ContextThreadPool
        # Dense layers may run on a GPU: the hidden states stay there if a server maps that GPU's memory,
        # else the wire starts from host memory. Routing stays there too for device-routed calls (same host,
        # mapping that memory), else it is planned on the host.
        if hidden.is_cuda and not any(self.shared_kind(r, hidden.device) for r in self.pool.members):
            hidden = hidden.cpu()
        routed = start_routed(self, layer, hidden, expert_ids, weights, deadline)
        if routed is not None:  # the routing stays on the device: no wait for it here
            return routed
        expert_ids, weights = to_host(expert_ids, weights)
        local = start_side(self, layer, hidden, expert_ids, weights, deadline)
        if local is not None:  # every server of this layer's plan is on this host: no event loop on the way
            return local
        calls = asyncio.run_coroutine_threadsafe(self._partials(layer, hidden, expert_ids, weights, deadline),
                                                 self.loop)
        return SummedPartials(calls, hidden.shape, hidden.device)

    def close(self) -> None:
        """Unlink the shared-memory arenas; stop the unwaited calls' watchdog."""
        if self.arenas is not None:
            self.arenas.close()
        if self.pending is not None:
            self.pending.close()

    async def run_async(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                        weights: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, K], weights [T, K] -> [T, H] float32; `deadline` is time.monotonic()."""
        return add_partials(await self._partials(layer, hidden, expert_ids, weights, deadline),
                            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device))

    async def _partials(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                        deadline: float | None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The layer's calls, failover included; each one's (first expert, rows, [rows, H] partial sum)."""
        partials: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        failures: Failures = {}
        slots = expert_counts(expert_ids, self.spec.num_experts)  # expert -> (token, expert) pairs
        await self._scatter(layer, hidden, expert_ids, weights, slots, deadline, frozenset(), failures, partials)
        return partials

    async def rescue(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                     counts: dict[int, int], deadline: float | None, excluded: frozenset[str],
                     failures: Failures, moved: bool = False) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Run `counts`' experts by gRPC on replicas not in `excluded` (a side-channel call failed); the
        (first expert, rows, [rows, H] partial sum) of each call. `moved`: the failure was a NOT_FOUND (a live
        drop), so plan on the fresh infos. Only then: an info fetch under way waits on every server's GetInfo,
        up to 5 s for one behind a cut link, which a failover must not wait for."""
        partials: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        if moved:
            await self.pool.placement_settled()
        await self._scatter(layer, hidden, expert_ids, weights, counts, deadline, excluded, failures, partials)
        return partials

    async def _scatter(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                       counts: dict[int, int], deadline: float | None, excluded: frozenset[str],
                       failures: Failures, partials: list) -> None:
        """Run `counts`' experts on replicas not in `excluded`, one concurrent call per chosen replica."""
        plan, missing = self.pool.assign(layer, counts, excluded)
        if missing:
            raise self._no_replica(layer, missing, failures)
        calls = [self._send(replica, chosen, layer, hidden, expert_ids, weights, counts, deadline, excluded,
                            failures, partials) for replica, chosen in plan.items()]
        if len(calls) == 1:
            await calls[0]
            return
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one sub-batch failed for good: the layer fails, stop the others
                task.cancel()
            raise

    async def _send(self, replica: Replica, chosen: list[int], layer: int, hidden: torch.Tensor,
                    expert_ids: torch.Tensor, weights: torch.Tensor, counts: dict[int, int], deadline: float | None,
                    excluded: frozenset[str], failures: Failures, partials: list) -> None:
        rows, ids = rows_for(expert_ids, chosen, self.spec.num_experts)  # tokens with >= 1 chosen expert
        request = zerocopy.RunExpertsRequest(  # tensors travel as views of their bytes, copied once
            layer=layer,
            expert_ids=to_wire(ids),
            weights=to_wire(weights.index_select(0, rows).float()),
            request_id=request_ids.current(),
        )
        request.model_fingerprint = self.pool.fingerprint
        kind = self.shared_kind(replica, hidden.device)
        arena = self.acquire(replica, hidden, rows.numel()) if kind else None
        done = False
        try:
            if arena is None:
                to_experts, request.output_dtype = self.wire_choice.for_call(rows.numel())
                request.hidden = to_wire(hidden.index_select(0, rows.to(hidden.device)).cpu(), to_experts)
                result = None
            else:
                result = self.stage(arena, request, hidden, rows)
            done = await self._call(replica, chosen, layer, hidden, expert_ids, weights, counts, deadline, excluded,
                                    failures, partials, request, rows, result)
        finally:
            if arena is not None:
                # After a failed, timed-out or cancelled call (even one another replica then answered) the
                # server may still write into the arena: it is dropped, never reused (the server's mapping
                # keeps the memory alive meanwhile).
                if done:
                    self.arenas.release(replica.address, arena)
                else:
                    arena.close()

    async def _call(self, replica: Replica, chosen: list[int], layer: int, hidden: torch.Tensor,
                    expert_ids: torch.Tensor, weights: torch.Tensor, counts: dict[int, int], deadline: float | None,
                    excluded: frozenset[str], failures: Failures, partials: list, request, rows: torch.Tensor,
                    result: torch.Tensor | None) -> bool:
        """One RunExperts call; its partial sums go to `partials` (read from `result` when shared). True if
        `replica` answered; False if the sums came from elsewhere (failover, or bytes after a refused region)."""
        slots = sum(counts[e] for e in chosen)
        where = f"layer {layer} experts {format_ranges(chosen)}"
        timeout = self.budget.timeout(replica, layer, chosen, excluded)  # short when another replica can take over
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded(f"{where}: the request's deadline passed" + tried(failures))
        replica.outstanding += slots
        started = time.monotonic()
        try:
            reply = await self.metrics.call_expert(replica.name, replica.run_experts, request, timeout=timeout)
            self.budget.observe(time.monotonic() - started)
        except grpc.aio.AioRpcError as err:
            reply, error = None, err
        finally:
            replica.outstanding -= slots
        if reply is None:
            reason = f"{error.code().name}: {error.details()}"
            if result is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION and "shared_" in reason:
                # This server cannot map our memory after all (another container, GPU or namespace):
                # it keeps its place in the pool, and gets the bytes in the message from now on.
                log.warning("expert server %s (%s) cannot use shared memory (%s); sending tensors by gRPC",
                            replica.name, replica.address, reason)
                replica.shared_kinds = frozenset()
                await self._send(replica, chosen, layer, hidden, expert_ids, weights, counts, deadline, excluded,
                                 failures, partials)
                return False
            if error.code() in FINAL:
                raise ServiceError(f"expert server {replica.name} ({replica.address}), {where}: {reason}") from error
            self.pool.report_failure(replica, reason, eject=error.code() not in NO_EJECT)
            # NOT_FOUND: the server dropped an expert live (pool.py fetches every server's info again):
            # plan these experts anew on the fresh info, this server included, once.
            moved = error.code() == grpc.StatusCode.NOT_FOUND and replica.address not in failures
            failures[replica.address] = (error.code(), f"{replica.name} ({replica.address}) {reason}")
            if moved:
                await self.pool.placement_settled()
            await self._scatter(layer, hidden, expert_ids, weights, {e: counts[e] for e in chosen}, deadline,
                                excluded if moved else excluded | {replica.address}, failures, partials)
            return False
        self.pool.report_success(replica, reply.placement_version)
        if result is not None:  # a shared result is read (copied out) before its arena goes back to the pool
            partials.append((min(chosen), rows, result.to(torch.float32, copy=True)))
            return True
        # A large call came back in pieces of rows (moe_client.striping): each is added where it belongs, no copy.
        for start, stop, output in striping.pieces(reply, rows.numel()):
            partials.append((min(chosen), rows[start:stop], from_wire(output, "output")))  # made float32 when added
        return True

    def shared_kind(self, replica: Replica, device: torch.device) -> int | None:
        """The shared-memory kind (RegionKind) to reach `replica` with for tensors on `device`, or None (gRPC
        bytes)."""
        if self.arenas is None:
            return None
        kind = kind_for(device)
        if kind not in replica.shared_kinds:
            return None
        if kind == CUDA:
            uuid = self._uuids.get(device)
            if uuid is None:
                uuid = self._uuids[device] = gpu_uuid(device)
            if uuid not in replica.gpu_uuids:
                return None
        return kind

    def routes_on(self, device: torch.device) -> bool:
        """Whether calls for tensors on `device` leave their routing there (device-routed calls)."""
        return device.type == "cuda" if self.device_routing is None else self.device_routing

    def acquire(self, replica: Replica, hidden: torch.Tensor, tokens: int, extra: int = 0) -> Arena | None:
        """An arena for `tokens` rows in and out (and `extra` bytes between them, aligned); None (gRPC bytes
        this time) if the memory is not there."""
        size = (aligned(tokens * hidden.shape[1] * TORCH_DTYPES[self.shared_dtype].itemsize) + aligned(extra)
                + tokens * hidden.shape[1] * TORCH_DTYPES[self.shared_out_dtype].itemsize)
        try:
            return self.arenas.acquire(replica.address, hidden.device, size)
        except (OSError, RuntimeError) as err:  # /dev/shm full, GPU out of memory
            log.warning("no shared memory for %d tokens to %s (%s); sending them by gRPC", tokens, replica.name, err)
            return None

    def stage(self, arena: Arena, request, hidden: torch.Tensor, rows: torch.Tensor | None,
              sync: bool = True) -> torch.Tensor:
        """Copy the routed rows (None: every row) into `arena`, name them and the result's place in `request`
        (right after the rows); returns that place.

        GPU writes are complete (stream synchronised) before the request can leave; `sync=False` leaves
        that to the caller (one synchronisation for all of a layer's calls)."""
        shape = (hidden.shape[0] if rows is None else rows.numel(), hidden.shape[1])
        out_at = aligned(shape[0] * shape[1] * TORCH_DTYPES[self.shared_dtype].itemsize)
        picked = hidden if rows is None else hidden.index_select(0, rows.to(hidden.device))
        arena.view(0, self.shared_dtype, shape).copy_(picked)
        if hidden.is_cuda and sync:
            torch.cuda.current_stream(hidden.device).synchronize()
        request.shared_hidden = arena.message(0, self.shared_dtype, shape)
        request.shared_output = arena.message(out_at, self.shared_out_dtype, shape)
        return arena.view(out_at, self.shared_out_dtype, shape)

    def _no_replica(self, layer: int, experts: list[int], failures: Failures) -> ServiceError:
        """UNAVAILABLE naming the pairs and why each owner is out; FAILED_PRECONDITION when they serve another
        checkpoint; RESOURCE_EXHAUSTED when every one tried was only busy."""
        why, refused = self.pool.explain(layer, experts)
        text = f"no expert server can run layer {layer} experts {format_ranges(experts)}: {why}" + tried(failures)
        codes = {code for code, _ in failures.values()}
        if refused or codes == {grpc.StatusCode.FAILED_PRECONDITION}:
            return FailedPrecondition(text)
        if codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}:
            return ResourceExhausted(text)
        return Unavailable(text)


class SummedPartials:
    """The future of a layer's gRPC calls: `result()` adds their partial sums on the caller's thread, so the
    event loop only moves bytes (tensor work there also wakes torch's worker threads, which then spin)."""

    def __init__(self, calls: concurrent.futures.Future, shape: torch.Size, device: torch.device):
        self._calls = calls
        self._shape = shape
        self._device = device
        self._out: torch.Tensor | None = None

    def done(self) -> bool:
        return self._calls.done()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if self._out is None:
            self._out = add_partials(self._calls.result(timeout),
                                     torch.zeros(self._shape, dtype=torch.float32, device=self._device))
        return self._out
