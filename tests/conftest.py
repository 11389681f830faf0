"""Shared fixtures: tiny checkpoints, and real gRPC servers on loopback in a background event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_serve.expert_server.main import ExpertServerConfig, create_server
from moe_serve.gateway.main import GatewayConfig, create_gateway
from moe_serve.synthetic import SyntheticConfig, write_checkpoint

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
    """Starts expert servers and gateways on port 0 and stops them all at teardown."""

    def __init__(self, loop: LoopThread):
        self.loop = loop
        self.handles = []
        self.servicers = {}  # gateway address -> its GatewayServicer, to reach its engine in-process
        self.expert_servicers = {}  # expert server address -> its ExpertServicer

    def expert_server(self, checkpoint: Path, experts=None, devices: str = "cpu", dtype: str = "float32",
                      name: str = "", **overrides) -> str:
        """Start one expert server; returns its 127.0.0.1:port address."""
        config = ExpertServerConfig(checkpoint=str(checkpoint), experts=experts, devices=devices, dtype=dtype,
                                    host="127.0.0.1", port=0, name=name, **overrides)
        handle, servicer = self.loop.run(create_server(config))
        self.handles.append(handle)
        self.expert_servicers[f"127.0.0.1:{handle.port}"] = servicer
        return f"127.0.0.1:{handle.port}"

    def gateway(self, checkpoint: Path, servers: list[str], **overrides) -> str:
        """Start a gateway over `servers`; returns its address."""
        options = {"connect_timeout": 20.0, **overrides}
        config = GatewayConfig(checkpoint=str(checkpoint), servers=servers, host="127.0.0.1", port=0, **options)
        handle, servicer = self.loop.run(create_gateway(config))
        self.handles.append(handle)
        self.servicers[f"127.0.0.1:{handle.port}"] = servicer
        return f"127.0.0.1:{handle.port}"

    def stop(self) -> None:
        for handle in reversed(self.handles):
            self.loop.run(handle.stop(0))
        self.handles.clear()


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
