"""Prototype under measurement: the dispatcher's requests sent from the calling thread on blocking channels."""

from __future__ import annotations

import torch

from moe_client import zerocopy
from moe_client.channel import insecure_channel, unary_callable
from moe_serve.rpc.codec import from_wire, to_wire


class SyncDispatcher:
    """ExpertBackend: as ExpertDispatcher, without the hop to the event loop (futures + one blocking call)."""

    def __init__(self, addresses: list[str], table: dict, wire_dtype: int, timeout: float = 900.0):
        self.channels = [insecure_channel(a) for a in addresses]
        self.calls = [unary_callable(c, "/moe.v1.ExpertService/RunExperts", zerocopy.RunExpertsResponse)
                      for c in self.channels]
        self.table, self.wire_dtype, self.timeout = table, wire_dtype, timeout

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        owner = self.table[layer][expert_ids]
        jobs = []
        for index, call in enumerate(self.calls):
            mine = owner == index
            rows = mine.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            ids = torch.where(mine, expert_ids, -1).index_select(0, rows).to(torch.int32)
            request = zerocopy.RunExpertsRequest(layer=layer, hidden=to_wire(hidden.index_select(0, rows),
                                                                             self.wire_dtype),
                                                 expert_ids=to_wire(ids),
                                                 weights=to_wire(weights.index_select(0, rows).float()))
            jobs.append((rows, call, request))
        futures = [(rows, call.future(request, timeout=self.timeout)) for rows, call, request in jobs[:-1]]
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        if jobs:
            rows, call, request = jobs[-1]
            out.index_add_(0, rows, from_wire(call(request, timeout=self.timeout).output, "output").float())
        for rows, future in futures:
            out.index_add_(0, rows, from_wire(future.result().output, "output").float())
        return out

    def close(self) -> None:
        for c in self.channels:
            c.close()
