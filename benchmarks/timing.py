"""Repeated timings, interleaved across variants (or synchronised with GPUs), summarised by median and spread."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping


def summary(seconds: list[float]) -> dict:
    """Median, quartiles, min and max of a list of timings, in seconds."""
    ordered = sorted(seconds)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "min": ordered[0],
            "max": ordered[-1], "n": len(ordered)}


def synchronize(devices) -> None:
    """Wait until every CUDA device among `devices` (torch.device or "cuda", "cuda:1", "cpu") has finished."""
    import torch

    for device in map(torch.device, devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def synced_times(fn: Callable[[], object], devices, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of `fn`, `repeats` times after `warmup` calls, the devices synchronised around each."""
    for _ in range(warmup):
        fn()
    synchronize(devices)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(devices)
        times.append(time.perf_counter() - start)
    return times


def interleaved(variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list]:
    """Seconds per call of every variant, `repeats` each, in rounds of one call each after `warmup` calls each.

    Rounds spread background load (the machine is shared) evenly over the variants, and each round's order is
    shuffled: a call pays for what the one before it left behind (another transport's threads still winding
    down, caches filled with other buffers), so no variant always follows the same one.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(repeats):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


class Samples:
    """Timings pooled per (row key, variant) across rounds and phases."""

    def __init__(self) -> None:
        self.seconds: dict[tuple, dict[str, list[float]]] = {}

    def add(self, key: tuple, times: Mapping[str, list[float]]) -> None:
        """Pool the timings of one interleaved run under row `key`."""
        row = self.seconds.setdefault(key, {})
        for name, values in times.items():
            row.setdefault(name, []).extend(values)

    def summaries(self, key: tuple) -> dict[str, dict]:
        """Summary per variant of row `key`."""
        return {name: summary(values) for name, values in self.seconds[key].items()}
