"""A MoE layer's calls to same-host expert servers, made from the model thread over the same-host channel.

When every server of a layer's plan is on this host, shares our memory and offers the channel
(rpc/local_channel.py), the model thread plans, stages the hidden states into the servers' arenas,
synchronises the GPU once, and writes one small frame per server: no event loop, no thread hand-off.
`result()` reads the replies and adds the partial sums, read straight from the arenas, in a fixed
order (by first expert, as the gRPC path does): the same input gives the same sum either way.

A call that fails goes, for its experts only, to the gRPC path's failover (dispatch.rescue on the
event loop) with that replica excluded; a bad request (INVALID_ARGUMENT) fails the layer as over gRPC.
Legend: T = tokens, H = hidden size, K = top-k.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import torch

from moe_client import zerocopy
from moe_client.ownership import format_ranges
from moe_client.pb import experts_pb2
from moe_serve.gateway.call_outcome import FINAL, NO_EJECT, Failures
from moe_serve.gateway.partial_sums import add_partials
from moe_serve.gateway.replica import Replica
from moe_serve.gateway.routing_plan import expert_counts, rows_for
from moe_serve.rpc import request_ids
from moe_serve.rpc.codec import to_wire
from moe_serve.rpc.errors import ServiceError
from moe_serve.rpc.local_channel import ChannelClosed, ChannelError, LocalLink
from moe_serve.rpc.shared_regions import Arena

# `dispatcher` below is the gateway's ExpertDispatcher (dispatch.py, which calls start_local): its pool,
# arenas, staging, metrics and gRPC failover (`rescue`). Not imported, so the two modules form no loop.


@dataclass
class _Part:
    """One server's share of the layer: its experts, their tokens, and where its sums land."""

    replica: Replica
    chosen: list[int]
    rows: torch.Tensor  # [T'] positions in the layer's batch, on the hidden states' device
    arena: Arena
    result: torch.Tensor  # [T', H] float32 view of the arena the server writes
    payload: bytes
    slots: int
    seq: int = 0
    link: LocalLink | None = None  # the channel it went on (the pool may open a new one meanwhile)
    sent_at: float = 0.0
    send_error: str = ""
    waited: bool = False  # its slots are off the replica's outstanding count


def start_local(dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, deadline: float | None) -> LocalRound | None:
    """Send the layer's calls if every server in its plan takes them over the same-host channel; else None
    (nothing sent: the gRPC path runs the layer)."""
    if dispatcher.arenas is None or not dispatcher.same_host_calls:
        return None
    counts = expert_counts(expert_ids, dispatcher.spec.num_experts)
    if not counts:
        return None
    plan, missing = dispatcher.pool.assign(layer, counts)
    if missing or not all(r.local_link() is not None and dispatcher.shared_kind(r, hidden.device) for r in plan):
        return None
    parts = _stage(dispatcher, layer, hidden, expert_ids, weights, counts, plan)
    if parts is None:
        return None
    round_ = LocalRound(dispatcher, layer, hidden, expert_ids, weights, counts, deadline, parts)
    round_.send()
    return round_


def _stage(dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
           weights: torch.Tensor, counts: dict[int, int], plan: dict[Replica, list[int]]) -> list[_Part] | None:
    """Each server's request, its hidden rows copied into an arena; None (arenas released) when shared memory
    runs out."""
    parts: list[_Part] = []
    for replica, chosen in sorted(plan.items(), key=lambda kv: min(kv[1])):
        rows, ids = rows_for(expert_ids, chosen, dispatcher.spec.num_experts)
        arena = dispatcher.acquire(replica, hidden, rows.numel())
        if arena is None:
            for part in parts:
                dispatcher.arenas.release(part.replica.address, part.arena)
            return None
        request = zerocopy.RunExpertsRequest(layer=layer, expert_ids=to_wire(ids),
                                             weights=to_wire(weights.index_select(0, rows).float()),
                                             request_id=request_ids.current())
        request.model_fingerprint = dispatcher.pool.fingerprint
        if hidden.is_cuda:  # once, asynchronously: the staging gathers by them and the sum adds by them
            rows = rows.pin_memory().to(hidden.device, non_blocking=True)
        result = dispatcher.stage(arena, request, hidden, rows, sync=False, device_rows=rows)
        parts.append(_Part(replica, chosen, rows, arena, result, request.SerializeToString(),
                           sum(counts[e] for e in chosen)))
    if hidden.is_cuda:  # every server reads what we wrote: one synchronisation for all of them
        torch.cuda.current_stream(hidden.device).synchronize()
    return parts


class LocalRound:
    """One layer's same-host calls in flight; `result()` waits for them like a Future."""

    def __init__(self, dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor, counts: dict[int, int], deadline: float | None, parts: list[_Part]):
        self.dispatcher = dispatcher
        self.layer = layer
        self.hidden = hidden
        self.expert_ids = expert_ids
        self.weights = weights
        self.counts = counts
        self.deadline = deadline
        self.parts = parts
        self.server_seconds = 0.0  # the servers' own compute, as their replies say (benchmarks read it)
        self._out: torch.Tensor | None = None

    def send(self) -> None:
        for part in self.parts:
            link = part.replica.local_link()
            part.replica.outstanding += part.slots
            part.sent_at = time.perf_counter()
            try:
                if link is None:
                    raise ChannelClosed("the same-host channel closed")
                part.link = link
                part.seq = link.send(part.payload)
            except ChannelClosed as err:
                part.send_error = str(err)

    def done(self) -> bool:
        return self._out is not None

    def result(self) -> torch.Tensor:
        """[T, H] float32: the layer's routed-expert sum, on the hidden states' device."""
        if self._out is None:
            out = torch.zeros(self.hidden.shape, dtype=torch.float32, device=self.hidden.device)
            failures: Failures = {}
            try:
                for part in self.parts:
                    self._gather(part, out, failures)
            finally:
                for part in self.parts:
                    if part.arena is not None:  # not gathered (an error above): never reused
                        part.arena.close()
                        part.arena = None
                    if not part.waited:  # its reply is not waited for: its work leaves the replica's count
                        part.waited = True
                        part.replica.outstanding -= part.slots
            self._out = out
        return self._out

    def _gather(self, part: _Part, out: torch.Tensor, failures: Failures) -> None:
        d = self.dispatcher
        replica = part.replica
        code, reason, reply = grpc.StatusCode.OK, "", None
        try:
            if part.send_error:
                raise ChannelClosed(part.send_error)
            reply = part.link.receive(part.seq, self._timeout(part))
        except ChannelError as err:
            code, reason = err.code, f"{err.code.name}: {err.details}"
        except ChannelClosed as err:
            code, reason = grpc.StatusCode.UNAVAILABLE, f"UNAVAILABLE: same-host channel: {err}"
        except TimeoutError as err:
            code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, f"DEADLINE_EXCEEDED: {err}"
        finally:
            part.waited = True
            replica.outstanding -= part.slots
            d.metrics.record_expert_call(replica.name, code.name, time.perf_counter() - part.sent_at,
                                         len(part.payload), len(reply) if reply is not None else 0)
        if code == grpc.StatusCode.OK:
            answer = experts_pb2.RunExpertsResponse.FromString(bytes(reply))
            self.server_seconds += answer.compute_seconds
            d.pool.report_success(replica, answer.placement_version)
            out.index_add_(0, part.rows.to(out.device), part.result)  # read in place: no copy out of the arena
            d.arenas.release(replica.address, part.arena)
            part.arena = None
            return
        # After a failure the server may still write into the arena: it is dropped, never reused.
        part.arena.close()
        part.arena = None
        where = f"layer {self.layer} experts {format_ranges(part.chosen)}"
        if code in FINAL:
            raise ServiceError(f"expert server {replica.name} ({replica.address}), {where}: {reason}")
        excluded = frozenset()
        if code == grpc.StatusCode.FAILED_PRECONDITION and "shared_" in reason:
            replica.shared_kinds = frozenset()  # it cannot map our memory after all: bytes by gRPC from now on
        else:
            d.loop.call_soon_threadsafe(d.pool.report_failure, replica, reason, code not in NO_EJECT)
            # NOT_FOUND: dropped live; the rescue plans on the fresh infos, this server included, once.
            moved = code == grpc.StatusCode.NOT_FOUND and replica.address not in failures
            failures[replica.address] = (code, f"{replica.name} ({replica.address}) {reason}")
            excluded = frozenset() if moved else frozenset({replica.address})
        rescued = asyncio.run_coroutine_threadsafe(
            d.rescue(self.layer, self.hidden, self.expert_ids, self.weights,
                     {e: self.counts[e] for e in part.chosen}, self.deadline, excluded, failures), d.loop).result()
        add_partials(rescued, out)

    def _timeout(self, part: _Part) -> float:
        timeout = self.dispatcher.timeout - (time.perf_counter() - part.sent_at)
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
        return max(timeout, 0.0)

