"""Shared fixtures, built on tests.support: tiny checkpoints, in-process servers on a background event loop,
and service processes stopped at teardown."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_serve.model.synthetic import write_checkpoint
from tests.support.checkpoints import TINY, write_causal_checkpoints
from tests.support.inprocess import Cluster
from tests.support.launch import ServiceProcess
from tests.support.threads import LoopThread


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread("test-aio-loop")
    yield loop
    loop.close()


@pytest.fixture
def cluster(loop_thread: LoopThread) -> Iterator[Cluster]:
    c = Cluster(loop_thread)
    yield c
    c.stop()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    """Processes a test launches (tests.support.launch); any still running at teardown are killed."""
    procs: list[ServiceProcess] = []
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small simple_moe checkpoint: hidden 64, 2 MoE layers, 8 experts, top-2."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="session")
def causal_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per causal architecture (tests.support.checkpoints.write_causal_checkpoints)."""
    seed = int.from_bytes(os.urandom(4), "little")  # fresh weights every run; printed on failure via the path
    return write_causal_checkpoints(tmp_path_factory.mktemp("causal"), seed)
