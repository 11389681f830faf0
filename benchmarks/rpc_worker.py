"""A torch.distributed.rpc worker of the seed's design: holds its experts, runs what the master sends.

It loads its share of the checkpoint into the expert server's own ExpertBank, so the weights and
kernels are those of the gRPC servers; only the transport and the design differ. Started by
benchmarks.procs.RpcPhase; the master calls the module-level functions below.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import torch
import torch.distributed.rpc as rpc

from benchmarks.model import LAYER
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.placement import parse_ranges
from moe_serve.process.malloc import keep_large_buffers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# TensorPipe between hosts: the TCP transport and the basic channel (no shared memory, no cross-memory attach).
TCP_ONLY = {"_transports": ["uv"], "_channels": ["basic"]}
BANK: ExpertBank | None = None


def echo(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """torch RPC's share of a RunExperts call, without the experts."""
    return hidden


def expert_outputs(layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """The seed's worker: rows x [N, H] grouped by expert, expert_ids [N] -> each row's expert output [N, H]."""
    ones = torch.ones(len(expert_ids), 1)
    out, _ = BANK.run(layer, x, expert_ids[:, None], ones)  # one (token, expert) pair per row, weight 1
    return out.to(x.dtype)


def combined(layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Server-side combine over torch RPC: [T, H] weighted sums, as RunExperts returns them."""
    out, _ = BANK.run(layer, hidden, expert_ids, weights)
    return out.to(hidden.dtype)


def _exit_with_parent() -> None:
    # If the master dies without stopping us, nothing else would.
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main() -> None:
    """Load this worker's experts (if given a checkpoint), join the RPC group, serve until SIGTERM."""
    global BANK
    threading.Thread(target=_exit_with_parent, name="orphan-watch", daemon=True).start()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--checkpoint")
    p.add_argument("--experts", help="expert ranges of layer 0, e.g. 0-31")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--generation", type=int, default=0, help="the master's count of earlier init_rpc calls")
    p.add_argument("--tcp-only", action="store_true", help="TensorPipe over TCP alone, as between hosts")
    p.add_argument("--malloc-default", action="store_true", help="leave glibc malloc's thresholds alone")
    args = p.parse_args()
    if not args.malloc_default:
        keep_large_buffers()  # the same process tuning as the expert servers get
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        owned = {LAYER: tuple(parse_ranges(args.experts))}
        BANK = ExpertBank.load(Checkpoint(args.checkpoint), owned, [torch.device("cpu")], DTYPES[args.dtype])
    rpc._init_counter = args.generation  # init_rpc prefixes store keys with it; the master's must match
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=600, init_method=args.init_method,
                                              **(TCP_ONLY if args.tcp_only else {}))
    rpc.init_rpc(f"worker{args.rank}-{args.generation}", rank=args.rank, world_size=args.world_size,
                 rpc_backend_options=options)
    # Serve until the master, done with the group, sends SIGTERM; exit without the interpreter's teardown of
    # TensorPipe's threads (a graceful rpc.shutdown would wait on the master, which leaves without one).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    from benchmarks import rpc_worker  # run as benchmarks.rpc_worker, where torch RPC resolves the functions

    rpc_worker.main()
