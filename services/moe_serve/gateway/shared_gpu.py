"""Whether the gateway's micro-batch overlap pays, when `--overlap` is left to the gateway.

Two processes on one GPU take turns on it: without NVIDIA's Multi-Process Service (MPS) the driver
time-slices their CUDA contexts, and two micro-batches in flight interleave the gateway's and a server's
kernels all the time. On an H200 (docs/gpu.md, second round) overlap then cost 12% of prefill and 18% of
decode, where under MPS it gained 28% and 4%. So overlap is on unless the gateway's dense layers share a
GPU with an expert server (its GetInfo's compute_gpu_uuids) and no MPS daemon is there to join.

Overlap is also off when every server takes calls the gateway does not wait for (gateway/pipelined_calls.py:
each on this host, announcing GetInfo's done_signals, no expert replicated, and stream memory operations work
on the dense layers' GPU). Then the host already runs ahead of the GPU, which is what overlap was for, and the
two micro-batches would share one stream (unwaited calls need the default stream), so their kernels cannot
overlap either. On the H200 under MPS, overlap took staged decode at batch 64 from 3,376 to 1,757 tok/s
(docs/gpu.md, sixth round).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from moe_serve.gateway.replica import Replica
from moe_serve.rpc import shared_regions, stream_signals

MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"  # where CUDA looks for the MPS control daemon unless told otherwise


def mps_daemon_present(env: Mapping[str, str] = os.environ) -> bool:
    """An MPS control daemon listens where this process's CUDA would look for one."""
    return (Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT) / "control").exists()


def calls_go_unwaited(pipelined: bool, dense_device: torch.device, pool) -> bool:
    """Whether, with --pipelined-calls `pipelined`, the gateway's calls to `pool`'s servers (gateway.pool.ServerPool)
    go unwaited: a GPU whose streams take memory operations, every server on this host announcing done_signals,
    and one serving owner for each expert of each MoE layer. A server on another host, or a replicated expert,
    gets waited-for calls, whose round trips overlap can hide."""
    members = list(pool.members)
    return (pipelined and dense_device.type == "cuda" and bool(members)
            and all(r.info.done_signals and r.info.host_id == shared_regions.host_id() for r in members)
            and all(pool.sole_plan(layer) is not None for layer in pool.spec.moe_layers)
            and stream_signals.available(dense_device))


def servers_sharing(gpu_uuid: str, members: Iterable[Replica]) -> list[str]:
    """Names of the expert servers that compute on the GPU `gpu_uuid`."""
    return [r.name for r in members if gpu_uuid in r.info.compute_gpu_uuids]


def context_switch_warning(dense_device: torch.device, members: Iterable[Replica], gpu_uuid: str | None = None,
                           mps: bool | None = None) -> str | None:
    """What to tell the operator when expert servers compute on the dense layers' GPU and no MPS daemon runs: each
    expert call then switches the GPU between two CUDA contexts. On the H200, MPS took a chain of unwaited calls
    from 0.80 to 0.57 ms a call and staged decode at batch 64 from 2,765 to 3,393 tok/s (docs/gpu.md, sixth
    round). None when nothing is shared or MPS is there."""
    if dense_device.type != "cuda":
        return None
    gpu_uuid = gpu_uuid or shared_regions.gpu_uuid(dense_device)
    sharing = servers_sharing(gpu_uuid, members)
    if not sharing or (mps_daemon_present() if mps is None else mps):
        return None
    return (f"expert servers {', '.join(sharing)} compute on {gpu_uuid} beside the dense layers with no MPS daemon: "
            "every expert call switches the GPU between CUDA contexts; start `nvidia-cuda-mps-control -d` before "
            "the gateway and those servers (docs/operations.md)")


def choose_overlap(asked: bool | None, dense_device: torch.device, members: Iterable[Replica],
                   gpu_uuid: str | None = None, mps: bool | None = None,
                   unwaited: bool = False) -> tuple[bool, str]:
    """(overlap on?, why) for --overlap `asked` (None: the gateway chooses); `gpu_uuid` of the dense device and
    `mps` are looked up when not given; `unwaited`: the gateway's calls to every server go unwaited."""
    if asked is not None:
        return asked, "set by --overlap" if asked else "set by --no-overlap"
    if dense_device.type != "cuda":
        return True, "dense layers on the CPU"
    if unwaited:
        return False, ("calls to every expert server go unwaited (the host runs ahead already, and the micro-batches "
                       "would share one stream)")
    if gpu_uuid is None:
        gpu_uuid = shared_regions.gpu_uuid(dense_device)
    sharing = servers_sharing(gpu_uuid, members)
    if not sharing:
        return True, f"no expert server computes on {gpu_uuid}"
    if mps_daemon_present() if mps is None else mps:
        return True, f"expert servers {', '.join(sharing)} share {gpu_uuid}, under MPS"
    return False, (f"expert servers {', '.join(sharing)} share {gpu_uuid} with the dense layers and no MPS daemon "
                   "runs: overlap would interleave two CUDA contexts on one GPU (docs/operations.md)")
