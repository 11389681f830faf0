"""Shared fixtures: tiny checkpoints, and real gRPC servers on loopback in a background event loop."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_serve.expert_server.main import ExpertServerConfig, create_server
from moe_serve.gateway.main import GatewayConfig, create_gateway
from moe_serve.model.synthetic import SyntheticConfig, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """Import scripts/NAME.py (the fault tests reuse the soak script's processes and load)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(name)


TINY = SyntheticConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_experts=8,
                       num_experts_per_tok=2, seed=1234)


class LoopThread:
    """An asyncio loop on its own thread, so blocking test code can talk to aio servers it hosts."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-aio-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        """Run a coroutine on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Cluster:
    """Starts expert servers and gateways (port 0 unless told) and stops them all at teardown."""

    def __init__(self, loop: LoopThread):
        self.loop = loop
        self.handles = []
        self.by_address = {}  # address -> ServerHandle
        self.servicers = {}  # address -> its servicer, to reach a gateway's engine or a server's executor
        self.expert_servicers = {}  # expert server address -> its ExpertServicer

    def _keep(self, address: str, handle, servicer) -> str:
        self.handles.append(handle)
        self.by_address[address] = handle
        self.servicers[address] = servicer
        return address

    def expert_server(self, checkpoint: Path, experts=None, devices: str = "cpu", dtype: str = "float32",
                      name: str = "", host: str = "127.0.0.1", port: int = 0, **overrides) -> str:
        """Start one expert server; returns its host:port address."""
        config = ExpertServerConfig(checkpoint=str(checkpoint), experts=experts, devices=devices, dtype=dtype,
                                    host=host, port=port, name=name, **overrides)
        handle, servicer = self.loop.run(create_server(config))
        self.expert_servicers[f"{host}:{handle.port}"] = servicer
        return self._keep(f"{host}:{handle.port}", handle, servicer)

    def gateway(self, checkpoint: Path, servers: list[str], **overrides) -> str:
        """Start a gateway over `servers`; returns its address."""
        options = {"connect_timeout": 20.0, **overrides}
        config = GatewayConfig(checkpoint=str(checkpoint), servers=servers, host="127.0.0.1", port=0, **options)
        handle, servicer = self.loop.run(create_gateway(config))
        return self._keep(f"127.0.0.1:{handle.port}", handle, servicer)

    def handle(self, address: str):
        """The ServerHandle of the server at `address`."""
        return self.by_address[address]

    def detach(self, address: str):
        """Forget the server at `address` (the caller stops it); returns its ServerHandle."""
        handle = self.by_address.pop(address)
        self.servicers.pop(address)
        self.handles.remove(handle)
        return handle

    def stop_one(self, address: str, grace: float = 0) -> None:
        """Stop one server now, as a crash (grace 0) or a graceful stop would."""
        self.loop.run(self.detach(address).stop(grace))

    def stop(self) -> None:
        for handle in reversed(self.handles):
            self.loop.run(handle.stop(0))
        self.handles.clear()
        self.by_address.clear()
        self.servicers.clear()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def cluster(loop_thread: LoopThread) -> Iterator[Cluster]:
    c = Cluster(loop_thread)
    yield c
    c.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Subprocesses a test starts; any still running at teardown are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small simple_moe checkpoint: hidden 64, 2 MoE layers, 8 experts, top-2."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="session")
def causal_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per causal architecture: the four transformers ones and deepseek.

    qwen2_moe is written sharded (model.safetensors.index.json), olmoe and deepseek with hub-style configs.
    """
    from deepseek_ref import write_checkpoint as write_deepseek
    from hf_models import ARCHS, build_checkpoint

    root = tmp_path_factory.mktemp("causal")
    seed = int.from_bytes(os.urandom(4), "little")  # fresh weights every run; printed on failure via the path
    paths = {arch: build_checkpoint(arch, root / f"{arch}-{seed}", seed + i, sharded=arch == "qwen2_moe",
                                    hub_style=arch == "olmoe")
             for i, arch in enumerate(ARCHS)}
    paths["deepseek"] = write_deepseek(root / f"deepseek-{seed}", seed + len(ARCHS))
    return paths
