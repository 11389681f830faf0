"""The seed's moe_multi_machine design rebuilt on torch.distributed.rpc, reasonably tuned.

Experts live on worker processes and the master calls them, as seed/USAGE_GUIDE.md's
moe_multi_machine does. Tuned as one would for a fair fight: one `rpc_async` per worker per layer,
all in flight together, each carrying the (token, expert) rows of that worker grouped by expert,
run by the same grouped kernels as the expert server; the master adds the gate-weighted outputs.
`RpcCombined` is the same transport with our design's server-side combine, to tell transport
from design.
Legend: T = tokens, H = hidden, K = top-k, N = routed (token, expert) pairs of one worker.
"""

from __future__ import annotations

import torch
import torch.distributed.rpc as rpc

from benchmarks import rpc_worker


class RpcSeedDesign:
    """ExpertBackend: each worker returns every routed pair's expert output; the master combines."""

    def __init__(self, owner: torch.Tensor, workers: list[str], dtype: torch.dtype = torch.float32):
        self.owner = owner  # [E] index into workers
        self.workers = workers
        self.dtype = dtype  # activations travel in the experts' compute dtype

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, K], weights [T, K] -> [T, H] float32."""
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        experts, tokens, gates = flat[order], order // k, weights.reshape(-1)[order]
        worker_of = self.owner[experts]
        x_all = hidden.to(self.dtype)
        calls = []
        for index, name in enumerate(self.workers):
            pairs = (worker_of == index).nonzero().squeeze(1)  # [N]
            if pairs.numel() == 0:
                continue
            x = x_all.index_select(0, tokens[pairs])  # [N, H]: a token once per expert it visits here
            future = rpc.rpc_async(name, rpc_worker.expert_outputs, args=(layer, x, experts[pairs]))
            calls.append((tokens[pairs], gates[pairs], future))
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for rows, gate, future in calls:
            out.index_add_(0, rows, future.wait().float() * gate[:, None])
        return out


class RpcCombined:
    """ExpertBackend: our design (tokens once per server, weighted sum on the server) over torch RPC."""

    def __init__(self, owner: torch.Tensor, workers: list[str], dtype: torch.dtype = torch.float32):
        self.owner = owner
        self.workers = workers
        self.dtype = dtype

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, K], weights [T, K] -> [T, H] float32."""
        server_of = self.owner[expert_ids]  # [T, K]
        x_all = hidden.to(self.dtype)
        calls = []
        for index, name in enumerate(self.workers):
            mine = server_of == index
            rows = mine.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            ids = torch.where(mine, expert_ids, -1).index_select(0, rows).to(torch.int32)
            future = rpc.rpc_async(name, rpc_worker.combined, args=(layer, x_all.index_select(0, rows), ids,
                                                                  weights.index_select(0, rows).float()))
            calls.append((rows, future))
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for rows, future in calls:
            out.index_add_(0, rows, future.wait().float())
        return out
