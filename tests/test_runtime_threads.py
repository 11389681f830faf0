"""Torch host threads: one per core when experts or dense layers compute on the CPU, a few on GPUs."""

import os

import torch

from moe_serve.process.threads import GPU_HOST_THREADS, set_torch_threads


def test_thread_defaults_follow_the_devices():
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(0, [torch.device("cpu")]) == before  # CPU compute keeps every core
        assert set_torch_threads(0, [torch.device("cuda", 0), torch.device("cpu")]) == before  # CPU offload too
        gpu_only = set_torch_threads(0, [torch.device("cuda", 0), torch.device("cuda", 1)])
        assert gpu_only == min(GPU_HOST_THREADS, os.cpu_count()) == torch.get_num_threads()
        assert set_torch_threads(3, [torch.device("cuda", 0)]) == 3 == torch.get_num_threads()  # asked for: kept
    finally:
        torch.set_num_threads(before)
