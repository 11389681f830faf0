"""Metrics computed at scrape time: per-expert token counts kept as vectors, and device memory."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class ExpertTokenCounter:
    """moe_expert_tokens_total{layer, expert}: one count vector per layer, turned into samples only when read.

    The counts come from `sources` watched here: an expert bank tallies tokens per expert on the device that
    computes them, inside its computation (on a GPU, in its CUDA graphs: no host work per call), and a read
    (a scrape) drains the tallies into the totals."""

    def __init__(self) -> None:
        self._counts: dict[int, torch.Tensor] = {}  # layer -> [experts] int64
        self._sources: list[Callable[[], list[tuple[int, Sequence[int], torch.Tensor]]]] = []
        self._held: dict[int, set[int]] = {}  # reported even at zero
        self._lock = threading.Lock()

    def hold(self, layer: int, experts: Iterable[int]) -> None:
        """Report these experts of `layer` from now on, at zero until tokens come."""
        self._held.setdefault(layer, set()).update(experts)

    def watch(self, source: Callable[[], list[tuple[int, Sequence[int], torch.Tensor]]]) -> None:
        """Add `source()`'s (layer, experts, tokens each got since the last call) to the totals at each read."""
        self._sources.append(source)

    def _fold(self) -> None:
        """Drain the sources into the totals (under the lock)."""
        for source in self._sources:
            for layer, experts, tokens in source():
                if not len(experts):
                    continue
                total = self._counts.get(layer)
                size = max(experts) + 1
                if total is None or total.numel() < size:
                    grown = torch.zeros(max(size, 0 if total is None else total.numel()), dtype=torch.long)
                    if total is not None:
                        grown[: total.numel()] = total
                    total = self._counts[layer] = grown
                total[list(experts)] += tokens

    def value(self, layer: int, expert: int) -> int:
        """Tokens counted so far for (layer, expert)."""
        with self._lock:
            self._fold()
            total = self._counts.get(layer)
            return int(total[expert]) if total is not None and expert < total.numel() else 0

    def counts(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> tokens counted so far, for every expert held or ever routed to here."""
        with self._lock:
            self._fold()
            totals = {layer: total.tolist() for layer, total in self._counts.items()}
        out = {(layer, e): n for layer, values in totals.items() for e, n in enumerate(values) if n}
        out.update({(layer, e): out.get((layer, e), 0) for layer, held in self._held.items() for e in held})
        return out

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("moe_expert_tokens", "Tokens routed to each (layer, expert) held here",
                                     labels=["layer", "expert"])
        with self._lock:
            self._fold()
            counts = {layer: total.tolist() for layer, total in self._counts.items()}
        for layer in sorted(set(counts) | set(self._held)):
            values = counts.get(layer, [])
            experts = self._held.get(layer, set()) | {e for e, n in enumerate(values) if n}
            for expert in sorted(experts):
                family.add_metric([str(layer), str(expert)], values[expert] if expert < len(values) else 0)
        yield family


class DeviceMemoryCollector:
    """moe_device_memory_bytes{device, kind}: resident memory for the CPU, torch's counters per GPU."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("moe_device_memory_bytes",
                                   "Memory in use: the process's resident set (cpu), torch's allocator (cuda:N)",
                                   labels=["device", "kind"])
        family.add_metric(["cpu", "rss"], resident_bytes())
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA for a scrape
            for i in range(torch.cuda.device_count()):
                device = f"cuda:{i}"
                family.add_metric([device, "allocated"], torch.cuda.memory_allocated(i))
                family.add_metric([device, "reserved"], torch.cuda.memory_reserved(i))
                family.add_metric([device, "peak_allocated"], torch.cuda.max_memory_allocated(i))
        yield family


def resident_bytes() -> float:
    """This process's resident set size in bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
