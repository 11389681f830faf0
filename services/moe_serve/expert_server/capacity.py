"""How many bytes of experts each device of an expert server may hold (--expert-capacity).

`cpu=8GiB,cuda:0=70GiB`: devices not named default to their physical memory (host RAM, the GPU's
total), so a live load never goes past what the device has, and a planner can pack by bytes.
"""

from __future__ import annotations

import os
import re

import torch

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'16.5MiB' -> bytes; ValueError naming the text otherwise."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (B, KiB, MiB, GiB, TiB, KB, MB, GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_capacity(text: str | None) -> dict[str, int]:
    """'cpu=8GiB,cuda:0=70GiB' -> {device: bytes}; '' or None -> {}."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        device, sep, size = item.partition("=")
        if not sep:
            raise ValueError(f"--expert-capacity {item!r}: expected DEVICE=SIZE, e.g. cpu=8GiB")
        out[str(torch.device(device.strip()))] = parse_size(size)
    return out


def device_memory(device: torch.device) -> int:
    """Physical memory of `device`: host RAM for the CPU, total memory for a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capacities(devices: list[torch.device], configured: dict[str, int]) -> dict[str, int]:
    """Bytes of experts each of `devices` may hold: as configured, else its physical memory."""
    unknown = sorted(set(configured) - {str(d) for d in devices})
    if unknown:
        raise ValueError(f"--expert-capacity names {', '.join(unknown)}, not among --devices "
                         f"{', '.join(str(d) for d in devices)}")
    return {str(d): configured.get(str(d)) or device_memory(d) for d in devices}
