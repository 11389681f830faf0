"""A MoE layer's calls to expert servers, made from the model thread over their side channels.

When every server of a layer's plan offers a side channel (rpc/side_channel.py), the model thread plans
and writes one frame per server: no event loop, no thread hand-off. Each server's share goes one of two
ways:
- same host, sharing our memory (a Unix socket): the hidden states are staged into the server's arena
  (one GPU synchronisation for all of them) and the frame carries only the routing; the sums are read
  straight from the arena;
- another host (TCP): the frame carries the hidden rows' bytes, in the wire dtypes chosen for the call's
  size, sent from their own buffers; the sums are read in place from the reply's frame.
`result()` reads the replies and adds the partial sums in a fixed order (by first expert, as the gRPC
path does): the same input gives the same sum either way. A device-routed round on a GPU whose experts
have one replica each goes unwaited instead (pipelined_calls.py): `result()` queues the sum behind GPU
waits for the servers' done words, and the replies are read (`settle`) a few calls later.

A call that fails goes, for its experts only, to the gRPC path's failover (dispatch.rescue on the
event loop) with that replica excluded; a bad request (INVALID_ARGUMENT) fails the layer as over gRPC.
Legend: T = tokens, H = hidden size, K = top-k.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import partial

import grpc
import torch

from moe_client import zerocopy
from moe_client.ownership import format_ranges
from moe_client.striping import piece_count, split_rows
from moe_serve.gateway.call_outcome import FINAL, NO_EJECT, Failures
from moe_serve.gateway.partial_sums import add_partials
from moe_serve.gateway.pipelined_calls import Word
from moe_serve.gateway.replica import Replica
from moe_serve.gateway.routed_staging import RoutedPlaces, routed_extra
from moe_serve.gateway.routing_plan import expert_counts, rows_for, to_host
from moe_serve.rpc import request_ids, side_lanes
from moe_serve.rpc.codec import TORCH_DTYPES, bytes_of, from_wire, to_wire
from moe_serve.rpc.errors import FailedPrecondition, ResourceExhausted, ServiceError, Unavailable
from moe_serve.rpc.output_tails import LAND_MIN_BYTES, answer, reply_bytes
from moe_serve.rpc.shared_regions import Arena
from moe_serve.rpc.side_channel import ChannelClosed, ChannelError, SideLink

# `dispatcher` below is the gateway's ExpertDispatcher (dispatch.py, which calls start_side): its pool,
# arenas, staging, metrics and gRPC failover (`rescue`). Not imported, so the two modules form no loop.


@dataclass
class _Piece:
    """One frame of a server's share: rows [start, stop) of it (all of them unless a large TCP call is split)."""

    start: int
    stop: int
    payload: list  # the request's pieces (its tensors' own buffers)
    size: int  # bytes of the request
    link: SideLink  # the channel it goes on (the pool may open a new one meanwhile)
    seq: int = 0
    send_error: str = ""
    into: memoryview | None = None  # where its reply's output lands (rows [start, stop) of its part's `landing`)


@dataclass
class _Part:
    """One server's share of the layer: its experts, their tokens, and where its sums land."""

    replica: Replica
    chosen: list[int]
    rows: torch.Tensor | None  # [T'] positions in the layer's batch, on the hidden states' device; None: all T
    arena: Arena | None  # same host: the region it reads and writes; None over TCP (bytes in the frames)
    result: torch.Tensor | None  # [T', H] float32 view of the arena the server writes
    pieces: list[_Piece]
    slots: int
    landing: torch.Tensor | None = None  # over TCP: [T', H] where its pieces' outputs land side by side (tail frames)
    sent_at: float = 0.0
    budget: float | None = None  # seconds the call may take (call_budget.py), fixed when it is sent
    arrived: float = 0.0  # when the last reply we waited for came (0: every reply was there already)
    waited: bool = False  # its slots are off the replica's outstanding count
    word: Word | None = None  # a call not waited for: the word its server sets (pipelined_calls.py)
    rescued: bool = False  # ... which we set ourselves instead: its sums are not to be used
    settling: bool = False  # the model thread is reading its reply (and sets the word itself if it failed)

    @property
    def size(self) -> int:
        return sum(piece.size for piece in self.pieces)


def start_side(dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
               weights: torch.Tensor, deadline: float | None) -> SideRound | None:
    """Send the layer's calls if every server in its plan takes them over a side channel; else None (nothing
    sent: the gRPC path runs the layer)."""
    if not dispatcher.side_calls:
        return None
    counts = expert_counts(expert_ids, dispatcher.spec.num_experts)
    if not counts:
        return None
    plan, missing = dispatcher.pool.assign(layer, counts)
    if missing:
        return None
    links = {r: _carrier(dispatcher, r, hidden.device) for r in plan}  # taken once: another thread may close one
    if not all(links.values()):
        return None
    parts = _stage(dispatcher, layer, hidden, expert_ids, weights, counts, plan, links)
    if parts is None:
        return None
    round_ = SideRound(dispatcher, layer, hidden, expert_ids, weights, counts, deadline, parts)
    round_.send()
    return round_


def start_routed(dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor, deadline: float | None) -> SideRound | None:
    """A device-routed round (expert_server/routed_calls.py) when every server of the layer's plan is on this
    host, maps the hidden states' memory and takes such calls; else None (nothing sent).

    The routing stays where it was computed: each server gets every token, the ids and weights in the arena
    beside the hidden states, and the list of experts it computes (the plan gives each expert of the layer
    to one replica, as for a host-routed call, without counting tokens). On a GPU neither side waits for it
    (rpc/gpu_events.py): the step's host work runs ahead of the GPU."""
    if (not dispatcher.side_calls or dispatcher.arenas is None or not dispatcher.routes_on(hidden.device)
            or expert_ids.device != hidden.device or weights.device != hidden.device):
        return None
    t, k = expert_ids.shape
    num_experts = dispatcher.spec.num_experts
    per_expert = max(1, t * k // num_experts)  # the slots each expert is reckoned to take (not counted)
    plan = dispatcher.pool.sole_plan(layer)  # one owner per expert (the usual case): no choice, cached
    # Not waited for only then: a failed call could go to no other replica (pipelined_calls.py)
    pending = dispatcher.pending if plan is not None else None
    if plan is None:
        plan, missing = dispatcher.pool.assign(layer, dict.fromkeys(range(num_experts), per_expert))
        if missing:
            return None
    links = {}
    for replica in plan:
        link = _carrier(dispatcher, replica, hidden.device)
        if link is None or link.tcp or not replica.routed_calls:  # same host, mapping our memory, taking them
            return None
        links[replica] = link
    if pending is not None and not pending.usable(plan, hidden.device):
        pending = None
    parts = _stage_routed(dispatcher, layer, hidden, expert_ids, weights, plan, links, per_expert, pending)
    if parts is None:
        return None
    round_ = SideRound(dispatcher, layer, hidden, expert_ids, weights, None, deadline, parts,
                       pipelined=pending is not None)
    round_.send()
    dispatcher.routed_rounds += 1
    return round_


def _stage_routed(dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                  plan: dict[Replica, list[int]], links: dict[Replica, SideLink], per_expert: int,
                  pending=None) -> list[_Part] | None:
    """Each server's request: the layer's hidden states, ids and weights copied into its arena (on the
    hidden states' device, no synchronisation); None (arenas released) when shared memory runs out.
    `pending` (pipelined_calls.PendingCalls): each request also names its call's done word, and the servers
    wait on each arena's own event.

    A request is its layer and id, then the rest, which names the arena's places and is the same call after
    call: serialised once per arena and shape (protobuf reads fields in any order), then the done word's
    index and value."""
    t, k = expert_ids.shape
    h = hidden.shape[1]
    # The servers' streams wait on our event (recorded below, once all is staged) instead of us on the GPU
    event = dispatcher.events.handle(hidden.device) if hidden.is_cuda and pending is None else b""
    head = zerocopy.RunExpertsRequest(layer=layer, request_id=request_ids.current())
    head_pieces, head_size = head._type.chunks(head)
    parts: list[_Part] = []
    for replica, chosen in sorted(plan.items(), key=lambda kv: min(kv[1])):
        arena = dispatcher.acquire(replica, hidden, t, extra=routed_extra(t, k))
        if arena is None:
            for part in parts:
                dispatcher.arenas.release(part.replica.address, part.arena)
            return None
        places = RoutedPlaces.of(arena, dispatcher.shared_dtype, dispatcher.shared_out_dtype, t, h, k)
        places.stage(hidden, expert_ids, weights)
        words = word = None
        if pending is not None:
            words, word = pending.word(replica.address, hidden.device)
            event = arena.record_event()
        key = ("routed", t, h, k, dispatcher.shared_dtype, dispatcher.shared_out_dtype, tuple(chosen), event,
               dispatcher.pool.fingerprint, words)
        body = arena.derived.get(key)
        if body is None:
            body = zerocopy.RunExpertsRequest(
                experts=chosen, model_fingerprint=dispatcher.pool.fingerprint, gpu_event=event,
                shared_done=words.message if words is not None else None, **places.messages).SerializeToString()
            arena.remember(key, body)
        payload = [*head_pieces, body] if word is None else [*head_pieces, body, word.fields()]
        piece = _Piece(0, t, payload, head_size + sum(len(p) for p in payload[len(head_pieces):]),
                       link=links[replica])
        parts.append(_Part(replica, chosen, None, arena, places.out, [piece], per_expert * len(chosen), word=word))
    if hidden.is_cuda and pending is None:
        dispatcher.events.record(hidden.device)
    return parts


def _carrier(dispatcher, replica: Replica, device: torch.device) -> SideLink | None:
    """`replica`'s side channel if its share can go there: TCP, or same host with memory it maps; else None."""
    link = replica.side_link()
    if link is None:
        return None
    usable = link.tcp or (dispatcher.arenas is not None and bool(dispatcher.shared_kind(replica, device)))
    return link if usable else None


def _stage(dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
           weights: torch.Tensor, counts: dict[int, int], plan: dict[Replica, list[int]],
           links: dict[Replica, SideLink]) -> list[_Part] | None:
    """Each server's request: its hidden rows copied into an arena (same host) or into the request (TCP); None
    (arenas released) when shared memory runs out."""
    parts: list[_Part] = []
    shared = False
    for replica, chosen in sorted(plan.items(), key=lambda kv: min(kv[1])):
        rows, ids = rows_for(expert_ids, chosen, dispatcher.spec.num_experts)
        tokens = rows.numel()
        if tokens == hidden.shape[0]:  # every token (often so in decode): no gathers, no row index on the device
            rows = None
        request = zerocopy.RunExpertsRequest(
            layer=layer, expert_ids=to_wire(ids), request_id=request_ids.current(),
            weights=to_wire((weights if rows is None else weights.index_select(0, rows)).float()))
        request.model_fingerprint = dispatcher.pool.fingerprint
        if hidden.is_cuda and rows is not None:  # once, asynchronously: the staging gathers by them, the sum adds
            rows = rows.pin_memory().to(hidden.device, non_blocking=True)
        if links[replica].tcp:
            arena = result = None
            to_experts, request.output_dtype = dispatcher.wire_choice.for_call(tokens)
            request.hidden = to_wire((hidden if rows is None else hidden.index_select(0, rows)).cpu(), to_experts)
            lanes = [links[replica], *(lane for lane in replica.side_lanes() if lane is not links[replica])]
            pieces = split_call(request, lanes, replica.min_piece_bytes, replica.pieces_per_lane)
            landing = landing_for(request, pieces, hidden.shape[1])
        else:
            landing = None
            arena = dispatcher.acquire(replica, hidden, tokens)
            if arena is None:
                for part in parts:
                    if part.arena is not None:
                        dispatcher.arenas.release(part.replica.address, part.arena)
                return None
            result = dispatcher.stage(arena, request, hidden, rows, sync=False)
            shared = True
            pieces = [_Piece(0, tokens, *request._type.chunks(request), link=links[replica])]
        parts.append(_Part(replica, chosen, rows, arena, result, pieces, sum(counts[e] for e in chosen), landing))
    if hidden.is_cuda and shared:  # every server reads what we wrote: one synchronisation for all of them
        torch.cuda.current_stream(hidden.device).synchronize()
    return parts


def split_call(request, links: list[SideLink], min_piece_bytes: int, per_link: int = 1) -> list[_Piece]:
    """A TCP call as frames: one, or, when its hidden states are 2 x `min_piece_bytes` or more (default 2 MiB),
    pieces of contiguous rows (moe_client.striping's lanes, over the side channel: a row's sum depends on that
    row alone), up to `per_link` a link, piece i on link i mod links. The links' pieces go at once, each link's
    in order (SideRound.send): the server answers a link's first piece while its next one still arrives."""
    parts = piece_count(request, len(links) * per_link, min_piece_bytes)
    if parts < 2:
        return [_Piece(0, request.hidden.shape[0], *request._type.chunks(request), link=links[0])]
    return [_Piece(start, stop, *piece._type.chunks(piece), link=links[i % len(links)])
            for i, (start, stop, piece) in enumerate(split_rows(request, parts))]


def by_link(pieces: list[_Piece]) -> list[list[_Piece]]:
    """`pieces` grouped by their link, in order within each group."""
    groups: dict[int, list[_Piece]] = {}
    for piece in pieces:
        groups.setdefault(id(piece.link), []).append(piece)
    return list(groups.values())


def send_in_order(pieces: list[_Piece], timeout: float) -> None:
    """Send one link's pieces one after another; a piece that cannot go (the link closed) is marked."""
    for piece in pieces:
        try:
            piece.seq = piece.link.send(piece.payload, timeout, piece.into)
        except ChannelClosed as err:
            piece.send_error = str(err)


def receive_in_order(pieces: list[_Piece], timeout: float) -> list[tuple]:
    """One link's pieces' (reply, when it came), in order, all within `timeout` s; on a failure the rest of them
    are forgotten (their replies dropped when they come) before it is raised."""
    deadline = time.monotonic() + timeout
    replies = []
    for i, piece in enumerate(pieces):
        try:
            replies.append(piece.link.receive_dated(piece.seq, max(0.0, deadline - time.monotonic())))
        except BaseException:
            for rest in pieces[i + 1:]:
                rest.link.forget(rest.seq)
            raise
    return replies


def landing_for(request, pieces: list[_Piece], width: int) -> torch.Tensor | None:
    """[T', H] in the reply's wire dtype for the pieces' outputs to land in side by side (each piece's `into`),
    when every piece's server sends tail frames (rpc/frames.py); None (each reply read into a frame of its own)
    otherwise, for fp8 replies (their row scales travel in the head) and for small ones (LAND_MIN_BYTES)."""
    dtype = TORCH_DTYPES.get(request.output_dtype or request.hidden.dtype)
    if dtype is None or not all(piece.link.tails for piece in pieces):
        return None
    shape = (request.hidden.shape[0], width)
    if shape[0] * width * dtype.itemsize < LAND_MIN_BYTES:
        return None
    landing = torch.empty(shape, dtype=dtype)
    whole, row = bytes_of(landing), width * dtype.itemsize
    for piece in pieces:
        piece.into = whole[piece.start * row:piece.stop * row]
    return landing


class SideRound:
    """One layer's side-channel calls in flight; `result()` waits for them like a Future."""

    def __init__(self, dispatcher, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor, counts: dict[int, int] | None, deadline: float | None, parts: list[_Part],
                 pipelined: bool = False):
        """`counts`: slots per expert (None for a device-routed round: counted on the host only for a failover);
        `pipelined`: `result()` does not wait for the replies (pipelined_calls.py)."""
        self.pipelined = pipelined
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
            part.replica.outstanding += part.slots
            part.sent_at = time.perf_counter()
            timeout = self._timeout(part)  # at most the call's budget waiting for room (a silent link fills it)
            # each link's pieces in order, the links at once; a piece whose link closed is marked (send_error)
            side_lanes.values(side_lanes.each([partial(send_in_order, pieces, timeout)
                                               for pieces in by_link(part.pieces)]))

    def done(self) -> bool:
        return self._out is not None

    def result(self) -> torch.Tensor:
        """[T, H] float32: the layer's routed-expert sum, on the hidden states' device."""
        if self._out is None and self.pipelined:
            self._out = self.dispatcher.pending.wait(self)
        if self._out is None:
            out = None  # made by the first share added (a copy of it when it has every row: no zeros to add to)
            failures: Failures = {}
            try:
                for part in self.parts:
                    out = self._gather(part, out, failures)
                if out is None:
                    out = self._zeros()
            finally:
                for part in self.parts:
                    if part.arena is not None:  # not gathered (an error above): never reused
                        part.arena.close()
                        part.arena = None
                    if not part.waited:  # its reply is not waited for: its work leaves the replica's count, and
                        part.waited = True  # the reply is dropped when it comes instead of kept by the link
                        part.replica.outstanding -= part.slots
                        for piece in part.pieces:
                            if not piece.send_error:
                                piece.link.forget(piece.seq)
            self._out = out
        return self._out

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.hidden.shape, dtype=torch.float32, device=self.hidden.device)

    def _gather(self, part: _Part, out: torch.Tensor | None, failures: Failures) -> torch.Tensor | None:
        """`out` with `part`'s sums added (or the rescue's, when it failed); None while nothing was added."""
        d = self.dispatcher
        replica = part.replica
        code, reason, replies = self._receive(part)
        if code == grpc.StatusCode.OK:
            answers = [answer(reply) for reply in replies]  # views into the frames (or our landing)
            if part.result is None:  # over TCP: each piece's sums in its reply, or all of them in the landing
                sums = [(piece.start, piece.stop, from_wire(a.output, "output"))
                        for piece, a in zip(part.pieces, answers, strict=True)]
                for start, stop, partial in sums:
                    want = (stop - start, self.hidden.shape[1])
                    if tuple(partial.shape) != want:
                        raise ServiceError(f"expert server {replica.name} ({replica.address}) answered layer "
                                           f"{self.layer} with output {list(partial.shape)} for {list(want)}")
                if _landed(part, replies, sums):
                    sums = [(0, part.pieces[-1].stop, part.landing)]
                    d.landed_calls += 1
            else:
                event = bytes(answers[0].gpu_event)
                if event:  # the server did not wait for its GPU work: our stream does, before reading
                    d.events.wait(part.result.device, event)
                sums = [(0, part.pieces[0].stop, part.result)]  # read in place: no copy out of the arena
            self._answered(part, answers)
            device = self.hidden.device
            rows = part.rows.to(device) if part.rows is not None else None
            # The first share added with every row becomes `out`: our own landing as it is, when its outputs
            # landed there in float32 on the right device; else a copy, a split call's pieces side by side (no
            # zeros to add them to; the arena or frame it was read from is reused).
            fresh = out is None and rows is None
            if fresh and part.landing is not None and sums[0][2] is part.landing and _as_sum(part.landing, device):
                out = part.landing
                sums = []
            elif fresh:
                out = torch.empty(self.hidden.shape, dtype=torch.float32, device=device)
            for start, stop, partial in sums:
                if fresh:
                    out[start:stop].copy_(partial)
                    continue
                out = self._zeros() if out is None else out
                partial = partial.to(device, torch.float32)
                if rows is None:  # the call had every row: piece i is rows [start, stop) of the layer
                    out[start:stop] += partial
                else:
                    out.index_add_(0, rows[start:stop], partial)
            if part.arena is not None:
                d.arenas.release(replica.address, part.arena)
                part.arena = None
            return out
        self._failed(part, code, reason)
        if code in FINAL:
            raise _layer_error(part, self.layer, code, reason)
        excluded, moved = frozenset(), False
        if code != grpc.StatusCode.FAILED_PRECONDITION or "shared_" not in reason:
            # NOT_FOUND: dropped live; the rescue plans on the fresh infos, this server included, once.
            moved = code == grpc.StatusCode.NOT_FOUND and replica.address not in failures
            failures[replica.address] = (code, f"{replica.name} ({replica.address}) {reason}")
            excluded = frozenset() if moved else frozenset({replica.address})
        expert_ids, weights, counts = self._host_routing()
        counts = {e: counts[e] for e in part.chosen if e in counts}
        if not counts:  # a device-routed share whose experts got no token: nothing to rescue
            return out
        rescued = asyncio.run_coroutine_threadsafe(
            d.rescue(self.layer, self.hidden, expert_ids, weights, counts, self.deadline, excluded, failures, moved),
            d.loop).result()
        return add_partials(rescued, self._zeros() if out is None else out)

    def settle(self, pending) -> None:
        """A pipelined round's replies, read after its sums were queued (pipelined_calls.py): arenas back to the
        pool, or, for a failed call, its word set by us and the layer's error raised (no replica to fail over to:
        the round went unwaited only because each expert had one)."""
        error: ServiceError | None = None
        for part in self.parts:
            part.settling = True  # before its reply is taken: the watchdog no longer counts on seeing it
            code, reason, replies = self._receive(part)
            if code == grpc.StatusCode.OK and part.rescued:  # its word was set for it (late): its sums are unsure
                code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED: no reply in time"
            if code == grpc.StatusCode.OK:
                self._answered(part, [answer(reply) for reply in replies])
                self.dispatcher.arenas.release(part.replica.address, part.arena)
                part.arena = None
                continue
            pending.rescue(part)
            self._failed(part, code, reason)
            if code == grpc.StatusCode.FAILED_PRECONDITION and "shared_done" in reason:
                part.replica.done_signals = False  # it cannot set our words: its calls are waited for from now on
            error = error or _layer_error(part, self.layer, code, reason)
        if error is not None:
            raise error

    def overdue(self, part: _Part) -> bool:
        return self._timeout(part) <= 0

    def _answered(self, part: _Part, answers: list) -> None:
        """Book a call that answered OK: the servers' compute, the call's time, the replica's placement version."""
        d = self.dispatcher
        self.server_seconds += max(answer.compute_seconds for answer in answers)
        if part.arrived:  # the call's own time, as the gRPC path observes it (call_budget.py)
            d.budget.observe(part.arrived - part.sent_at)
        d.pool.report_success(part.replica, max(answer.placement_version for answer in answers))

    def _failed(self, part: _Part, code: grpc.StatusCode, reason: str) -> None:
        """Book a failed call: its arena dropped (the server may still write there: never reused), and the
        replica reported, or told to get bytes by gRPC when it cannot map our memory after all."""
        if part.arena is not None:
            part.arena.close()
            part.arena = None
        if code in FINAL:
            return
        d = self.dispatcher
        if code == grpc.StatusCode.FAILED_PRECONDITION and "shared_" in reason:
            if "shared_done" not in reason:
                part.replica.shared_kinds = frozenset()  # it cannot map our memory after all: bytes by gRPC
        else:
            d.loop.call_soon_threadsafe(d.pool.report_failure, part.replica, reason, code not in NO_EJECT)

    def _host_routing(self) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """The routing on the host and its slots per expert, as the gRPC failover plans with them."""
        if self.counts is None:
            self.expert_ids, self.weights = to_host(self.expert_ids, self.weights)
            self.counts = expert_counts(self.expert_ids, self.dispatcher.spec.num_experts)
        return self.expert_ids, self.weights, self.counts

    def _receive(self, part: _Part) -> tuple[grpc.StatusCode, str, list[memoryview]]:
        """Every piece's reply (a split call's read at once, rpc/side_lanes.py), or the first failure (the other
        pieces' replies are then dropped: the share goes elsewhere whole)."""
        code, reason, replies = grpc.StatusCode.OK, "", []
        waited = False  # every piece's reply waited for (read, or its wait ended: a late reply is then dropped)
        try:
            failed = next((piece.send_error for piece in part.pieces if piece.send_error), "")
            if failed:
                raise ChannelClosed(failed)
            timeout = self._timeout(part)
            # Each reply with when it came if a thread waited for it then (else 0: one already there came while
            # the caller computed or waited on another server, and dating the call by it would inflate the budget)
            groups = by_link(part.pieces)
            waits = side_lanes.each([partial(receive_in_order, pieces, timeout) for pieces in groups])  # links at once
            waited = True
            got: dict[int, memoryview] = {}
            for pieces, (dated, error) in zip(groups, waits, strict=True):
                if error is not None:
                    raise error
                for piece, (payload, arrived) in zip(pieces, dated, strict=True):
                    got[id(piece)] = payload
                    part.arrived = max(part.arrived, arrived)
            replies = [got[id(piece)] for piece in part.pieces]
        except ChannelError as err:
            code, reason = err.code, f"{err.code.name}: {err.details}"
        except ChannelClosed as err:
            code, reason = grpc.StatusCode.UNAVAILABLE, f"UNAVAILABLE: side channel: {err}"
        except TimeoutError as err:
            code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, f"DEADLINE_EXCEEDED: {err}"
            if part.pieces[len(replies)].link.tcp:
                # Silence on TCP may be a dead link, which gives no error: its sends would soon block on a full
                # buffer. Closed; the pool opens it again once the server answers GetInfo (gRPC meanwhile).
                for piece in part.pieces:
                    piece.link.close()
        finally:
            part.waited = True
            part.replica.outstanding -= part.slots
            for piece in part.pieces if not waited else ():  # a piece failed to go: the others' replies dropped
                if not piece.send_error:
                    piece.link.forget(piece.seq)
            self.dispatcher.metrics.record_expert_call(part.replica.name, code.name,
                                                       time.perf_counter() - part.sent_at, part.size,
                                                       sum(reply_bytes(r) for r in replies))
        return code, reason, replies

    def _timeout(self, part: _Part) -> float:
        # As over gRPC: short when another replica can take over (call_budget.py), else the full --rpc-timeout.
        if part.budget is None:  # once a call (a layer's 64 experts are a loop over their owners)
            part.budget = self.dispatcher.budget.timeout(part.replica, self.layer, part.chosen, frozenset())
        timeout = part.budget - (time.perf_counter() - part.sent_at)
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
        return max(timeout, 0.0)


def _landed(part: _Part, replies: list, sums: list) -> bool:
    """Whether every piece's output landed in `part.landing` (tail frames, each of its size) in its dtype."""
    if part.landing is None:
        return False
    return all(getattr(reply, "landed", False) and partial.dtype == part.landing.dtype
               for reply, (_, _, partial) in zip(replies, sums, strict=True))


def _as_sum(landing: torch.Tensor, device: torch.device) -> bool:
    return landing.dtype == torch.float32 and landing.device == device


def _layer_error(part: _Part, layer: int, code: grpc.StatusCode, reason: str) -> ServiceError:
    """The error a layer fails with when `part`'s call failed and no other replica holds its experts, as the
    gRPC failover would raise it."""
    replica = part.replica
    text = f"expert server {replica.name} ({replica.address}), layer {layer} experts {format_ranges(part.chosen)}"
    if code in FINAL:
        return ServiceError(f"{text}: {reason}")
    kind = {grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
            grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted}.get(code, Unavailable)
    return kind(f"{text}: {reason}; no other replica holds these experts")
