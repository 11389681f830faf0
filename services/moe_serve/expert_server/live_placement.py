"""Experts loaded and dropped while the server serves; the placement version gateways follow.

A load reads only the new experts' tensors, stacks them with the layer's experts already on that
device (off the event loop), and swaps the layer's stacks under the bank's lock, between two
computations. A drop first stops listing the experts (the version grows, so gateways fetch GetInfo
again and route away), keeps serving the calls that still come for them until none has come for
`quiet` seconds, and swaps them out once no call checked against them is still being answered. One
change runs at a time; a change lock (`moe-serve rebalance` takes it on every server) keeps two
operators from interleaving.
Legend: G = experts stacked on a device, I = expert width, H = hidden size.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

import torch

from moe_client.ownership import Ownership, format_ownership, format_ranges
from moe_serve.core.experts import ExpertWeights
from moe_serve.core.grouped import StackedExperts
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)
QUIET_SECONDS = 0.5  # a dropping expert goes once no call has come for it this long
LINGER_SECONDS = 2.5  # ... and no sooner than this after GetInfo stopped listing it: above the gateways' 2 s
# GetInfo poll (PoolOptions.info_interval), so an idle gateway has heard of the drop before it happens
DRAIN_SECONDS = 10.0  # ... or after this long regardless
LOCK_TTL = 300.0


def merged(old: StackedExperts | None, new: StackedExperts) -> StackedExperts:
    """`old` and `new` experts of one device as one stack, slots in expert order."""
    if old is None:
        return new
    ids = old.expert_ids + new.expert_ids
    order = sorted(range(len(ids)), key=ids.__getitem__)
    index = torch.tensor(order, device=new.device)
    gate_up = torch.cat([old.gate_up, new.gate_up]).index_select(0, index)  # [G, 2I, H]
    down = torch.cat([old.down, new.down]).index_select(0, index)  # [G, H, I]
    return StackedExperts(tuple(ids[i] for i in order), gate_up, down)


def without(stacked: StackedExperts, drop: set[int]) -> StackedExperts | None:
    """`stacked` less the experts in `drop` (a copy, so their memory goes), or None when none is left."""
    keep = [slot for slot, e in enumerate(stacked.expert_ids) if e not in drop]
    if not keep:
        return None
    index = torch.tensor(keep, device=stacked.device)
    return StackedExperts(tuple(stacked.expert_ids[s] for s in keep), stacked.gate_up.index_select(0, index),
                          stacked.down.index_select(0, index))


class InflightCalls:
    """RunExperts calls checked and not yet answered, and when a call last named a dropping expert.

    `enter` runs in the servicer's `prepare`, under the bank's lock, once the bank has checked the call; a
    drop's last look (`busy`) takes that lock too, so a call either is seen here or is checked after the
    experts are gone (NOT_FOUND). Calls are held by weak reference to their Work: an answered or failed
    call leaves by itself. (Not to their id tensor: a device-routed call's ids are a view of the caller's
    memory that the server keeps from call to call.)
    """

    def __init__(self) -> None:
        self._calls: list[weakref.ref] = []  # merger.Work: layer, expert_ids [T, K]
        self.watched: dict[int, torch.Tensor] = {}  # layer -> expert ids being dropped
        self.last_touch = 0.0

    def enter(self, work) -> None:
        """`work` (a merger.Work, checked) is in flight until it is dropped."""
        self._calls = [c for c in self._calls if c() is not None]
        self._calls.append(weakref.ref(work))
        watched = self.watched.get(work.layer)
        if watched is not None and _names_any(work.expert_ids, watched):
            self.last_touch = time.monotonic()

    def busy(self) -> bool:
        """A call in flight names a watched expert (call under the bank's lock)."""
        for ref in self._calls:
            work = ref()
            if work is not None and work.layer in self.watched and _names_any(work.expert_ids,
                                                                              self.watched[work.layer]):
                return True
        return False


def _names_any(expert_ids: torch.Tensor, watched: torch.Tensor) -> bool:
    """Whether a call's ids (on the host, or a device-routed call's on its GPU) name a watched expert."""
    return bool(torch.isin(expert_ids, watched.to(expert_ids.device)).any())


class LivePlacement:
    """Loads and drops the experts of a serving bank; `version` and `dropping` feed GetInfo."""

    def __init__(self, bank: ExpertBank, checkpoint: Checkpoint, devices: list[torch.device],
                 capacity: dict[str, int], calls: InflightCalls, on_change: Callable[[], None],
                 quiet: float = QUIET_SECONDS, linger: float = LINGER_SECONDS):
        self.bank = bank
        self.checkpoint = checkpoint
        self.devices = list(devices)
        self.capacity = capacity
        self.calls = calls
        self.on_change = on_change  # rebuild GetInfo (and metrics) after version or dropping changed
        self.quiet = quiet
        self.linger = linger
        self.version = 1
        self.dropping: dict[int, set[int]] = {}
        self.holder, self.holder_until = "", 0.0
        self._changing = asyncio.Lock()
        spec = checkpoint.spec
        self.expert_bytes = 3 * spec.hidden_size * spec.expert_width * bank.dtype.itemsize

    # --- the change lock ------------------------------------------------------------------------

    def acquire(self, holder: str, ttl: float) -> None:
        """Take the change lock for `holder`; ABORTED naming the other holder while one holds it."""
        if not holder:
            raise InvalidArgument("holder: empty; name the rebalance taking the lock")
        self._check_holder(holder, taking=True)
        self.holder, self.holder_until = holder, time.monotonic() + (ttl or LOCK_TTL)

    def release(self, holder: str) -> None:
        if holder == self.holder:
            self.holder, self.holder_until = "", 0.0

    def _check_holder(self, holder: str, taking: bool = False) -> None:
        now = time.monotonic()
        if self.holder and now < self.holder_until and holder != self.holder:
            raise Aborted(f"another change is in progress: lock held by {self.holder!r} for "
                          f"{self.holder_until - now:.0f}s more" + ("" if taking else f" (this call names {holder!r})"))

    # --- load -----------------------------------------------------------------------------------

    async def load(self, wanted: Ownership, device: str = "", holder: str = "") -> float:
        """Read `wanted` from the checkpoint onto a device and serve them; seconds taken."""
        start = time.monotonic()
        self._check_holder(holder)
        self._check_pairs(wanted)
        async with self._changing:
            owned = self.bank.owned
            held = {layer: [e for e in ids if e in owned.get(layer, ())] for layer, ids in wanted.items()}
            held = {layer: ids for layer, ids in held.items() if ids}
            if held:
                raise FailedPrecondition(f"already held here: {'; '.join(format_ownership(held))}")
            target = self._pick_device(device, sum(len(ids) for ids in wanted.values()))
            await asyncio.get_running_loop().run_in_executor(None, self._load_and_swap, wanted, target)
            self.version += 1
            self.on_change()
        seconds = time.monotonic() - start
        log.info("loaded %s on %s in %.2fs (placement version %d)", "; ".join(format_ownership(wanted)), target,
                 seconds, self.version)
        return seconds

    def _check_pairs(self, wanted: Ownership) -> None:
        spec = self.checkpoint.spec
        if not wanted or not any(wanted.values()):
            raise InvalidArgument("experts: empty; name at least one (layer, expert)")
        for layer, ids in wanted.items():
            if layer not in spec.moe_layers:
                raise InvalidArgument(f"layer {layer} is not a MoE layer of the checkpoint "
                                      f"(its MoE layers: {format_ranges(spec.moe_layers)})")
            bad = [e for e in ids if e >= spec.num_experts]
            if bad:
                raise InvalidArgument(f"layer {layer}: experts {format_ranges(bad)} are not in the checkpoint "
                                      f"({spec.num_experts} experts per layer: 0-{spec.num_experts - 1})")

    def used(self) -> dict[str, int]:
        """Bytes of experts on each of the server's devices."""
        held = self.bank.nbytes_by_device()
        return {str(d): held.get(str(d), 0) for d in self.devices}

    def _pick_device(self, device: str, count: int) -> torch.device:
        used = self.used()
        if device:
            name = str(torch.device(device)) if device else ""
            if name not in self.capacity:
                raise InvalidArgument(f"device {device!r} is not one of this server's devices "
                                      f"({', '.join(self.capacity)})")
        else:  # the device with the most room left
            name = max(self.capacity, key=lambda d: self.capacity[d] - used[d])
        need = count * self.expert_bytes
        if used[name] + need > self.capacity[name]:
            raise ResourceExhausted(
                f"no room on {name}: {count} expert(s) of {self.expert_bytes / 2**20:.2f} MiB need "
                f"{need / 2**20:.1f} MiB, {max(0, self.capacity[name] - used[name]) / 2**20:.1f} MiB of its "
                f"{self.capacity[name] / 2**20:.1f} MiB capacity is free (--expert-capacity)")
        return torch.device(name)

    def _load_and_swap(self, wanted: Ownership, device: torch.device) -> None:
        """Read and stack on a worker thread, then swap under the bank's lock (between two computations)."""
        stacks = self._read_merged(wanted, device)
        with self.bank.lock:
            for layer, stacked in stacks.items():
                self.bank.replace_stacks(layer, {**self.bank.stacks(layer), device: stacked})

    def _read_merged(self, wanted: Ownership, device: torch.device) -> dict[int, StackedExperts]:
        """Per layer: the device's stack with `wanted` added (nothing served changes)."""
        spec = self.checkpoint.spec
        h, i = spec.hidden_size, spec.expert_width
        out = {}
        for layer, ids in sorted(wanted.items()):
            experts = {}
            for expert in ids:
                tensors = [self.checkpoint.load(name, shape) for name, shape in
                           zip(spec.expert_names(layer, expert), ((i, h), (i, h), (h, i)), strict=True)]
                experts[expert] = ExpertWeights(*tensors).to(device, self.bank.dtype)
            out[layer] = merged(self.bank.stacks(layer).get(device), StackedExperts.stack(experts))
        return out

    # --- drop -----------------------------------------------------------------------------------

    async def drop(self, wanted: Ownership, holder: str = "", drain: float = 0.0) -> float:
        """Stop listing `wanted`, serve their stragglers, then free them; seconds spent draining."""
        self._check_holder(holder)
        self._check_pairs(wanted)
        async with self._changing:
            owned = self.bank.owned
            absent = {layer: [e for e in ids if e not in owned.get(layer, ())] for layer, ids in wanted.items()}
            absent = {layer: ids for layer, ids in absent.items() if ids}
            if absent:
                raise NotFound(f"not held here: {'; '.join(format_ownership(absent))} "
                               f"(this server holds {'; '.join(format_ownership(owned)) or 'nothing'})")
            self.dropping = {layer: set(ids) for layer, ids in wanted.items()}
            self.calls.watched = {layer: torch.tensor(sorted(ids)) for layer, ids in wanted.items()}
            self.calls.last_touch = time.monotonic()
            self.version += 1
            self.on_change()  # gateways see the version in their next reply and route away
            start = time.monotonic()
            try:
                await self._drain(drain or DRAIN_SECONDS)
                loop = asyncio.get_running_loop()
                while not await loop.run_in_executor(None, self._try_remove, wanted):
                    await asyncio.sleep(0.02)  # a call checked before the drop is still being answered
            finally:
                self.dropping, self.calls.watched = {}, {}
                self.version += 1
                self.on_change()
        return time.monotonic() - start

    def _try_remove(self, wanted: Ownership) -> bool:
        """Swap `wanted` out unless a call that names them is still in flight; True once done."""
        kept = {layer: {d: s for d, s in ((d, without(s, set(ids))) for d, s in self.bank.stacks(layer).items())
                        if s is not None} for layer, ids in wanted.items()}  # copies made outside the lock
        with self.bank.lock:
            if self.calls.busy():
                return False
            for layer, stacks in kept.items():
                self.bank.replace_stacks(layer, stacks)
        return True

    async def _drain(self, limit: float) -> None:
        start = time.monotonic()
        deadline = start + max(limit, self.linger)
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now - start >= self.linger and now - self.calls.last_touch >= self.quiet:
                return
            await asyncio.sleep(0.02)
        log.warning("dropping %s: calls still came after %.1fs; dropping anyway (later ones get NOT_FOUND)",
                    "; ".join(format_ownership({k: sorted(v) for k, v in self.dropping.items()})), limit)

    def listed(self) -> Ownership:
        """What GetInfo lists: the bank's experts less those being dropped."""
        return {layer: tuple(e for e in ids if e not in self.dropping.get(layer, ()))
                for layer, ids in self.bank.owned.items()
                if any(e not in self.dropping.get(layer, ()) for e in ids)}
