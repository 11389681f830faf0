"""What `moe-serve --version` prints: moe-serve's version and those of the runtime it runs on (Python,
torch and its CUDA, gRPC, protobuf, ...), so an image or a bug report names what it contains."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version

# The packages whose versions change behaviour or numbers; constraints.txt pins them all.
PACKAGES = ("moe-serve", "moe-client", "torch", "grpcio", "grpcio-health-checking", "protobuf", "numpy",
            "safetensors", "tokenizers", "prometheus-client")


def versions() -> dict[str, str]:
    """{name: version} of Python, PACKAGES (missing ones as 'not installed') and torch's CUDA build."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    import torch  # only now: the package versions above need no torch import

    found["torch cuda"] = torch.version.cuda or "none (CPU build)"
    return found


def versions_text() -> str:
    """One 'name version' line each, the first naming moe-serve."""
    found = versions()
    return "\n".join([f"moe-serve {found.pop('moe-serve')}", *(f"  {k} {v}" for k, v in found.items())])


class PrintVersions(argparse.Action):
    """--version: print versions_text() as it is (argparse's own action rewraps it) and exit 0."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions_text())
        parser.exit()
