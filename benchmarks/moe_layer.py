"""One MoE layer at DeepSeek-MoE-16B's shape: ours vs the seed's design on torch RPC vs in-process.

Every variant routes the same input with the same router in this process and runs the same
experts with the same kernels (ExpertBank): in-process here, or split over two worker processes
reached by the gateway's ExpertDispatcher over gRPC (ours: the real moe-expert-server on unix
sockets, tensors as message bytes or, as the gateway does for same-host servers, in /dev/shm), or
by torch RPC (the seed's design, and our design on torch RPC). gRPC and torch RPC
phases alternate (benchmarks.procs), each timed interleaved with in-process. Errors are against
the fp32 in-process output for the same input.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.model import LAYER, InProcess, Shape, make_input, moe_layer, owner_table
from benchmarks.procs import GrpcPhase, RpcPhase
from benchmarks.rpc_design import RpcCombined, RpcSeedDesign
from benchmarks.sync_dispatch import SyncDispatcher
from benchmarks.timing import Samples, interleaved, summary
from moe_client import wire
from moe_serve.model.checkpoint import Checkpoint
from tests.support.threads import LoopThread

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# In-process runs inside both kinds of phase: the yardstick for load that changes between phases.
IN_GRPC, IN_RPC = "in-process, gRPC phases", "in-process, torch RPC phases"
WIRE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3")


def errors(got: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max absolute error, and relative RMS error ||got - ref|| / ||ref||."""
    diff = got.float() - reference
    return {"max_abs": float(diff.abs().max()), "rel_rms": float(diff.norm() / reference.norm()),
            "ref_max_abs": float(reference.abs().max())}


def _repeats(tokens: int, quick: bool, smoke: bool) -> int:
    if smoke:
        return 2
    if tokens >= 1024:
        return 2 if quick else 5
    return (4 if quick else 10) if tokens >= 128 else (15 if quick else 40)


class MoeBench:
    """The MoE-layer sections over one generated checkpoint."""

    def __init__(self, loop: LoopThread, checkpoint_dir: Path, shape: Shape, quick: bool, smoke: bool,
                 workers: int = 2, threads: int = 1, sync_variant: bool = False):
        self.loop, self.dir, self.shape = loop, checkpoint_dir, shape
        self.quick, self.smoke, self.workers, self.threads = quick, smoke, workers, threads
        self.sync_variant = sync_variant  # also time the prototype without the event-loop hand-off
        self.checkpoint = Checkpoint(checkpoint_dir)
        self.router = self.checkpoint.load(self.checkpoint.spec.router_name(LAYER))
        self.reference: dict[int, torch.Tensor] = {}

    def layer(self, x: torch.Tensor, backend) -> torch.Tensor:
        """The MoE layer over `backend`."""
        return moe_layer(x, self.router, self.shape.top_k, backend)

    def _time(self, samples: Samples, key: tuple, variants: dict, tokens: int, outputs: dict | None = None) -> None:
        x = make_input(self.shape, tokens)
        if outputs is not None:
            outputs.update({name: self.layer(x, backend) for name, backend in variants.items()})
        samples.add(key, interleaved({name: (lambda b=backend: self.layer(x, b)) for name, backend in variants.items()},
                                     _repeats(tokens, self.quick, self.smoke)))

    def compare(self, tokens_list: list[int], dtype: str, rounds: int) -> list[dict]:
        """Ours vs torch RPC (seed design, and with server-side combine) vs in-process, per token count."""
        local = InProcess(self.checkpoint, DTYPES[dtype])
        samples, outputs = Samples(), {t: {} for t in tokens_list}
        wire_dtype = wire.dtype_from_name(dtype)
        for r in range(rounds):
            with GrpcPhase(self.loop, self.dir, self.shape, self.workers, dtype, self.threads) as phase:
                sync = SyncDispatcher(phase.addresses, phase.table, wire_dtype) if self.sync_variant else None
                for tokens in tokens_list:
                    variants = {IN_GRPC: local, "ours": phase.dispatcher(wire_dtype),
                                "ours, shared memory": phase.dispatcher(wire_dtype, shared_memory=True),
                                "ours, same-host channel": phase.dispatcher(wire_dtype, shared_memory=True,
                                                                            same_host_calls=True)}
                    if sync is not None:
                        variants["ours sync"] = sync
                    self._time(samples, (tokens,), variants, tokens, outputs[tokens] if r == 0 else None)
                if sync is not None:
                    sync.close()
            with RpcPhase(self.workers, self.dir, self.shape, dtype, self.threads) as group:
                owner = owner_table(self.shape, self.workers)
                for tokens in tokens_list:
                    variants = {IN_RPC: local, "torch RPC (seed design)": RpcSeedDesign(owner, group.names,
                                                                                             DTYPES[dtype]),
                                "torch RPC + server combine": RpcCombined(owner, group.names, DTYPES[dtype])}
                    self._time(samples, (tokens,), variants, tokens, outputs[tokens] if r == 0 else None)
        rows = []
        for tokens in tokens_list:
            outputs[tokens]["in-process"] = outputs[tokens].pop(IN_GRPC)
            outputs[tokens].pop(IN_RPC)
            if dtype == "float32":
                self.reference[tokens] = outputs[tokens]["in-process"]
            seconds = samples.seconds[(tokens,)]
            variants = samples.summaries((tokens,))
            variants["in-process"] = summary(seconds[IN_GRPC] + seconds[IN_RPC])  # the yardstick, every phase
            row = {"dtype": dtype, "tokens": tokens, "variants": variants}
            if tokens in self.reference:
                row["errors"] = {n: errors(out, self.reference[tokens]) for n, out in outputs[tokens].items()}
            rows.append(row)
        return rows

    def wire_dtypes(self, tokens_list: list[int]) -> list[dict]:
        """fp32 experts; hidden states and replies on the wire in each wire dtype: time, and error vs fp32."""
        samples, rows = Samples(), []
        with GrpcPhase(self.loop, self.dir, self.shape, self.workers, "float32", self.threads) as phase:
            for tokens in tokens_list:
                outputs: dict = {}
                variants = {name: phase.dispatcher(wire.dtype_from_name(name)) for name in WIRE_DTYPES}
                self._time(samples, (tokens,), variants, tokens, outputs)
                reference = self.reference.get(tokens, outputs["float32"])
                rows.append({"tokens": tokens, "variants": samples.summaries((tokens,)),
                             "errors": {n: errors(out, reference) for n, out in outputs.items()}})
        return rows

    def threads_per_server(self, tokens_list: list[int], settings: tuple[int, ...], rounds: int) -> list[dict]:
        """Expert servers with each torch-threads setting in turn (fresh processes), round after round."""
        times: dict[tuple[int, int], list[float]] = {}
        for _ in range(rounds):
            for n in settings:
                with GrpcPhase(self.loop, self.dir, self.shape, self.workers, "float32", n) as phase:
                    backend = phase.dispatcher()
                    for tokens in tokens_list:
                        x = make_input(self.shape, tokens)
                        got = interleaved({"ours": lambda b=backend, x=x: self.layer(x, b)},
                                          _repeats(tokens, self.quick, self.smoke))
                        times.setdefault((tokens, n), []).extend(got["ours"])
        return [{"tokens": t, "threads": {n: summary(times[t, n]) for n in settings}} for t in tokens_list]
