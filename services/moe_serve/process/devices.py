"""Parse and check device lists like 'cuda:0,cuda:1,cpu'."""

from __future__ import annotations

import torch


def parse_devices(text: str | list[str]) -> list[torch.device]:
    """'cuda:0,cuda:1,cpu' -> devices; 'cuda' alone means every visible GPU. Raises ValueError naming the bad one."""
    items = [d.strip() for d in (text.split(",") if isinstance(text, str) else text) if d.strip()]
    if not items:
        raise ValueError("device list is empty")
    devices: list[torch.device] = []
    for item in items:
        try:
            device = torch.device(item)
        except RuntimeError as err:
            raise ValueError(f"device {item!r} is not a torch device name (e.g. cpu, cuda:0)") from err
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if count == 0:
                raise ValueError(f"device {item!r}: no CUDA GPU is visible (torch.cuda.device_count() == 0)")
            if device.index is None:
                devices.extend(torch.device("cuda", i) for i in range(count))
                continue
            if device.index >= count:
                raise ValueError(f"device {item!r}: only {count} GPU(s) visible (cuda:0-{count - 1})")
        elif device.type != "cpu":
            raise ValueError(f"device {item!r}: only cpu and cuda devices are supported")
        devices.append(device)
    return devices


def describe_devices() -> list[str]:
    """Lines like the seed's 'GPU 0: NVIDIA H100 80GB HBM3', or a note that only the CPU is there."""
    count = torch.cuda.device_count()
    if count == 0:
        return ["Available GPUs: 0 (experts run on the CPU)"]
    return [f"Available GPUs: {count}"] + [f"  GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(count)]
