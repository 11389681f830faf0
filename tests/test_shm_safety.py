"""/dev/shm as an attacker on the same host sees it: symlinks, FIFOs and other users' files named as regions,
and stale regions of killed gateways.

An expert server must open only regular files of its own user, never through a symlink, and give one answer
for every refused region, so that the answers tell nothing about other files (their existence, size or
first bytes).
"""

import logging
import os
import secrets
import signal
import stat

import grpc
import numpy as np
import pytest
import torch

from moe_client import GatewayClient, wire, zerocopy
from moe_serve.rpc import shared_regions
from moe_serve.rpc.shared_regions import SHM_DIR, Arena
from tests.support.calls import run_experts
from tests.support.launch import launch
from tests.support.references import reference_forward

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
REFUSED = "is not a region this server can use"


@pytest.fixture
def server(cluster, tiny_checkpoint):
    return cluster.expert_server(tiny_checkpoint, experts="0-7")


@pytest.fixture
def planted():
    """Paths made in /dev/shm by the test, removed afterwards."""
    paths = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def _call(server: str, field: str, name: str, size: int, key: bytes, tokens: int = 4):
    """RunExperts with `field` (shared_hidden or shared_output) naming the region; the other tensor travels in
    the message (an output in the message when the input is shared)."""
    rng = np.random.default_rng()
    hidden = rng.standard_normal((tokens, 64), dtype=np.float32)
    region = zerocopy.SharedRegion(kind=shared_regions.SHM, name=name, size=size, key=key)
    shared = zerocopy.SharedTensor(dtype=wire.FLOAT32, shape=hidden.shape, region=region, offset=256)
    fields = {field: shared} if field == "shared_hidden" else {"hidden": wire.encode_view(hidden), field: shared}
    request = zerocopy.RunExpertsRequest(
        layer=1, expert_ids=wire.encode_view(rng.integers(0, 8, (tokens, 2)).astype(np.int32)),
        weights=wire.encode_view(rng.random((tokens, 2), dtype=np.float32)), **fields)
    return run_experts(server, request)


def _refused(server: str, field: str, name: str, size: int, key: bytes) -> str:
    """The details of the refusal, with the region's name taken out (it is the caller's own)."""
    with pytest.raises(grpc.RpcError) as err:
        _call(server, field, name, size, key)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert REFUSED in err.value.details(), err.value.details()
    return err.value.details().replace(repr(name), "NAME")


def _victim(tmp_path, mode: int) -> tuple:
    """A file outside /dev/shm whose first 16 bytes an attacker can guess, as /etc/passwd's."""
    path = tmp_path / f"victim-{mode:o}"
    content = b"root:x:0:0:root:" + secrets.token_bytes((1 << 20) - 16)
    path.write_bytes(content)
    path.chmod(mode)
    return path, content


@pytest.mark.parametrize("field", ["shared_output", "shared_hidden"])
def test_a_symlink_to_another_file_is_refused_and_the_file_untouched(server, tmp_path, planted, field):
    victim, content = _victim(tmp_path, 0o644 if field == "shared_output" else 0o600)
    link = SHM_DIR / f"moe-evil{secrets.token_hex(4)}"
    link.symlink_to(victim)
    planted.append(link)
    _refused(server, field, link.name, len(content), content[:16])
    assert victim.read_bytes() == content


def test_a_symlink_to_a_valid_region_is_refused(server, planted):
    arena = Arena(torch.device("cpu"), 1 << 20)
    try:
        link = SHM_DIR / f"moe-link{secrets.token_hex(4)}"
        link.symlink_to(SHM_DIR / arena.region.name)
        planted.append(link)
        _refused(server, "shared_output", link.name, arena.region.size, bytes(arena.region.key))
        # The region itself, named as it is, serves.
        _call(server, "shared_output", arena.region.name, arena.region.size, bytes(arena.region.key))
    finally:
        arena.close()


def _region_file(planted, tag: str, uid: int | None = None) -> tuple:
    path = SHM_DIR / f"moe-{tag}{secrets.token_hex(4)}"
    content = secrets.token_bytes(1 << 20)
    path.write_bytes(content)
    path.chmod(0o600)
    planted.append(path)
    if uid is not None:
        os.chown(path, uid, -1)
    return path, content


@ROOT_ONLY
def test_a_region_of_another_user_is_refused_even_with_its_key(server, planted):
    path, content = _region_file(planted, "other", uid=65534)
    _refused(server, "shared_output", path.name, len(content), content[:16])
    assert path.read_bytes() == content


def test_every_refusal_gets_one_answer(server, planted, caplog):
    """Missing, symlink, FIFO, another user's file, too small, wrong key: the same code and the same text; the
    server's log says which check refused (never the caller)."""
    caplog.set_level(logging.DEBUG, logger="moe_serve.rpc.shm_files")
    mine, content = _region_file(planted, "mine")
    key = content[:16]
    fifo = SHM_DIR / f"moe-fifo{secrets.token_hex(4)}"
    os.mkfifo(fifo, 0o600)
    planted.append(fifo)
    link = SHM_DIR / f"moe-ln{secrets.token_hex(4)}"
    link.symlink_to(mine)
    planted.append(link)
    cases = {
        "missing": (f"moe-gone{secrets.token_hex(4)}", len(content), key),
        "symlink": (link.name, len(content), key),
        "fifo": (fifo.name, len(content), key),
        "too small": (mine.name, len(content) * 2, key),
        "wrong key": (mine.name, len(content), secrets.token_bytes(16)),
        "short key": (mine.name, len(content), key[:15]),
    }
    if os.geteuid() == 0:
        other, other_content = _region_file(planted, "other", uid=65534)
        cases["another user's"] = (other.name, len(other_content), other_content[:16])
    answers = {case: _refused(server, "shared_output", *args) for case, args in cases.items()}
    assert len(set(answers.values())) == 1, answers
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and mine.read_bytes() == content
    why = {r.getMessage().rsplit(": ", 1)[-1] for r in caplog.records if r.name == "moe_serve.rpc.shm_files"}
    assert {"cannot open", "not a regular file", "too small", "wrong key", "key length"} <= why, why
    caplog.clear()
    try:  # the right key on the right file serves
        _call(server, "shared_output", mine.name, len(content), key)
    except grpc.RpcError as err:  # say what the server saw, not only that it refused
        logged = [r.getMessage() for r in caplog.records]
        raise AssertionError(f"{err.details()}; server log: {logged}; file: {os.lstat(mine)}") from err


def test_gateway_start_removes_stale_regions_of_dead_gateways(tiny_checkpoint, tmp_path, processes):
    """A gateway killed with SIGKILL leaves its regions; the next gateway's start removes them, and only those of
    dead processes: a live gateway's regions stay."""
    server = launch("expert-server", tmp_path / "e.log", checkpoint=tiny_checkpoint, experts="all")
    processes.append(server)
    killed, alive = (launch("gateway", tmp_path / f"g{i}.log", checkpoint=tiny_checkpoint, servers=[server.address])
                     for i in (1, 2))
    processes += [killed, alive]
    hidden = np.random.default_rng().standard_normal((16, 64), dtype=np.float32)
    regions = {}
    for gateway in (killed, alive):
        gateway.wait_ready()
        with GatewayClient(gateway.address) as client:
            assert np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
        regions[gateway] = {p.name for p in SHM_DIR.glob(f"moe-{gateway.pid}-*")}
        assert regions[gateway], "the gateway made no shared-memory region"
    killed.kill()
    assert all((SHM_DIR / name).exists() for name in regions[killed])  # SIGKILL: nothing cleaned up
    third = launch("gateway", tmp_path / "g3.log", checkpoint=tiny_checkpoint, servers=[server.address])
    processes.append(third)
    third.wait_ready()
    assert not any((SHM_DIR / name).exists() for name in regions[killed])
    assert all((SHM_DIR / name).exists() for name in regions[alive])
    assert f"removed {len(regions[killed])} stale shared-memory region" in third.output()
    for p in (alive, third, server):
        p.signal(signal.SIGTERM)
