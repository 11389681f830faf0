"""Device-routed RunExperts calls: the routing stays where the caller computed it (its GPU).

A same-host caller whose dense layers run on a GPU leaves the whole layer's hidden states, expert ids
and gate weights in memory it shares (shared_regions.py) and lists the experts this server computes
for it (`experts`). No routing plan, no host copy of the ids: the server checks the list against what
it owns on the host; expert_sums skips ids of experts held elsewhere, -1 and ids out of range, and when
the list is not all the layer's experts here (replicas share the layer) the others are set to -1 first.
With `gpu_event` neither side waits for the GPU (rpc/gpu_events.py).

What a routed call does not get, since that would mean waiting for the GPU: the NaN/Inf check of the
hidden states and weights (the caller is a same-host peer admitted by uid and token), and per-expert
token counts on the host at once (they are counted on the GPU and read at the next scrape).
Legend: T = tokens, H = hidden size, K = top-k, E = experts per layer.
"""

from __future__ import annotations

import threading

import torch

from moe_client import wire
from moe_serve.rpc.errors import InvalidArgument
from moe_serve.rpc.shared_regions import SHARED_DTYPES, RegionMaps

_IDS = (wire.INT64, wire.INT32)
_WEIGHTS = (wire.FLOAT32,)


def decode_routed(request, hidden_size: int, num_experts: int,
                  regions: RegionMaps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """hidden [T, H], expert ids [T, K], weights [T, K] (views of the caller's memory) and the experts to
    compute; InvalidArgument names the bad field."""
    if not request.shared_hidden.region.kind or not request.shared_output.region.kind:
        raise InvalidArgument("shared_expert_ids: set without shared_hidden and shared_output; a device-routed "
                              "call leaves all of its tensors in shared memory")
    if request.expert_ids.shape or request.weights.shape or request.hidden.shape:
        raise InvalidArgument("shared_expert_ids: set together with tensors in the message; send one form")
    hidden = regions.tensor(request.shared_hidden, "shared_hidden", SHARED_DTYPES)
    ids = regions.tensor(request.shared_expert_ids, "shared_expert_ids", _IDS)
    weights = regions.tensor(request.shared_weights, "shared_weights", _WEIGHTS)
    if hidden.shape[1] != hidden_size or hidden.shape[0] == 0:
        raise InvalidArgument(f"shared_hidden.shape: {list(hidden.shape)} must be [tokens >= 1, {hidden_size}]")
    if ids.shape[0] != hidden.shape[0] or ids.shape[1] == 0:
        raise InvalidArgument(f"shared_expert_ids.shape: {list(ids.shape)} must be [{hidden.shape[0]}, K], K >= 1")
    if weights.shape != ids.shape:
        raise InvalidArgument(f"shared_weights.shape: {list(weights.shape)} differs from shared_expert_ids "
                              f"{list(ids.shape)}")
    if len({t.device for t in (hidden, ids, weights)}) != 1:
        raise InvalidArgument("shared_hidden, shared_expert_ids, shared_weights: in different memories; "
                              "a device-routed call keeps them on one device")
    experts = list(request.experts)
    if not experts:
        raise InvalidArgument("experts: empty; a device-routed call lists the experts this server computes")
    if experts != sorted(set(experts)) or experts[-1] >= num_experts:
        raise InvalidArgument(f"experts: {experts[:8]}{'...' if len(experts) > 8 else ''} must be ascending, "
                              f"distinct and below {num_experts}")
    return hidden, ids, weights, experts


class ExpertMasks:
    """Per (experts listed, device): an [E + 1] bool table, entry e + 1 true for a listed expert (entry 0: -1)."""

    def __init__(self, num_experts: int, limit: int = 256):
        self.num_experts = num_experts
        self.limit = limit
        self._tables: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._lock = threading.Lock()

    def keep(self, ids: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """[T, K] int64: `ids` with every id not listed (or out of range) set to -1; no host synchronisation."""
        table = self._table(tuple(experts), ids.device)
        ids = ids.long()
        index = torch.where((ids >= 0) & (ids < self.num_experts), ids + 1, 0)
        return torch.where(table[index], ids, -1)

    def _table(self, experts: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (experts, device)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                host = torch.zeros(self.num_experts + 1, dtype=torch.bool)
                host[torch.tensor(experts, dtype=torch.long) + 1] = True
                if len(self._tables) >= self.limit:
                    self._tables.pop(next(iter(self._tables)))
                table = self._tables[key] = host.to(device)
        return table
