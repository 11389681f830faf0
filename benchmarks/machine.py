"""What the benchmark ran on: CPU, cores, memory, load, and the versions that matter."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def describe() -> dict:
    """Machine and software description for the JSON report."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_mem_gib(), 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "numpy": _version("numpy"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        # OpenMP's wait after a parallel region, as the processes started from here take it (process/openmp.py)
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


def one_line(info: dict) -> str:
    """The description as one line for the printed table."""
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; python {info['python']}, "
            f"torch {info['torch']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}; "
            f"load average at start {info['load_average_at_start']}")
