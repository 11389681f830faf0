"""How many host threads torch may use in a service."""

from __future__ import annotations

import os

import torch

GPU_HOST_THREADS = 4  # torch threads of a service whose tensors all live on GPUs


def set_torch_threads(requested: int, devices: list[torch.device]) -> int:
    """Set torch's intra-op threads: `requested`, or (0) one per core when any compute is on the CPU, else
    GPU_HOST_THREADS. On a many-core host every parallel region of a host copy or check wakes all the
    threads (docs/gpu.md: the cost on a 64-core H100 host)."""
    if requested <= 0:
        cpu_compute = any(d.type == "cpu" for d in devices)
        requested = torch.get_num_threads() if cpu_compute else min(GPU_HOST_THREADS, os.cpu_count() or 1)
    torch.set_num_threads(requested)
    return requested
