"""Same-host fast path: hidden states and sums through shared memory instead of message bytes.

On CPU the regions are /dev/shm objects; the CUDA IPC kind runs the same code with GPU arenas and is
exercised on GPU hosts (benchmarks/gpu_model.py and the GPU test at the end).
"""

import secrets
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from moe_client import GatewayClient, wire, zerocopy
from moe_serve.core.routing import route
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.pool import ServerPool
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc import shared_regions
from moe_serve.rpc.shared_regions import SHM, Arena, ArenaPool, RegionMaps
from tests.support.calls import run_experts
from tests.support.launch import gpu_expert_servers
from tests.support.references import plain_torch, reference_forward


def _mapped(cluster, server: str) -> int:
    """Regions the expert server at `server` has mapped so far."""
    regions = cluster.expert_servicers[server].regions
    return 0 if regions is None else len(regions._maps)


@pytest.mark.parametrize("tokens", [1, 33, 2048])
def test_forward_through_shared_memory_equals_reference(cluster, tiny_checkpoint, tokens):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-2", "3-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    hidden = np.random.default_rng().standard_normal((tokens, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        first = client.forward(hidden)
        second = client.forward(hidden[::-1].copy())  # the arenas are reused for the next call
    want = reference_forward(tiny_checkpoint, hidden)
    assert np.abs(first - want).max() <= 1e-5
    assert np.abs(second - want[::-1]).max() <= 1e-5
    pool = cluster.servicers[gateway].engine.experts.inner.pool
    assert all(r.shared_kinds >= {shared_regions.SHM} for r in pool.members)
    # One token picks top-2 of 8 experts: both may sit on one server, and the other is never called.
    mapped = [_mapped(cluster, s) >= 1 for s in servers]
    assert all(mapped) if tokens > 1 else any(mapped)


def test_results_are_read_out_before_the_arena_is_reused(cluster, tiny_checkpoint, monkeypatch):
    """An arena goes back to the pool once its call is done, and the next call may overwrite it at once.
    Poisoning every released arena (0xFF bytes: NaN) makes any result still read from one show."""
    release = ArenaPool.release

    def poison_then_release(self, owner, arena):
        arena.poison()
        release(self, owner, arena)

    monkeypatch.setattr(ArenaPool, "release", poison_then_release)
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers, batching=BatchingConfig(batching=False))
    rng = np.random.default_rng()
    inputs = [rng.standard_normal((int(rng.integers(1, 40)), 64), dtype=np.float32) for _ in range(16)]
    with GatewayClient(gateway) as client, ThreadPoolExecutor(8) as pool:  # concurrent calls, too
        got = list(pool.map(client.forward, inputs))
    for x, y in zip(inputs, got, strict=True):
        assert np.abs(y - reference_forward(tiny_checkpoint, x)).max() <= 1e-5
    assert all(_mapped(cluster, s) >= 1 for s in servers)


@pytest.mark.parametrize("gateway_on, server_on", [(False, True), (True, False)])
def test_either_side_can_turn_it_off(cluster, tiny_checkpoint, gateway_on, server_on):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e, shared_memory=server_on) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers, shared_memory=gateway_on)
    hidden = np.random.default_rng().standard_normal((3, 7, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    assert all(_mapped(cluster, s) == 0 for s in servers)


def test_a_server_on_another_host_id_gets_bytes(cluster, tiny_checkpoint, monkeypatch):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    for s in servers:  # as a container with its own host name would report
        info = cluster.expert_servicers[s].info
        info.host_id = "elsewhere/" + info.host_id
    gateway = cluster.gateway(tiny_checkpoint, servers)
    hidden = np.random.default_rng().standard_normal((5, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    assert all(_mapped(cluster, s) == 0 for s in servers)


def test_gateway_falls_back_when_the_server_cannot_map(cluster, tiny_checkpoint, tmp_path, monkeypatch):
    """A server that claims the host but sees another /dev/shm (a container sharing the host name): the
    first call is refused with FAILED_PRECONDITION, the gateway sends bytes from then on, nothing fails."""
    released, closed = [], []
    release, close = ArenaPool.release, Arena.close
    monkeypatch.setattr(ArenaPool, "release", lambda self, owner, a: (released.append(a), release(self, owner, a)))
    monkeypatch.setattr(Arena, "close", lambda self: (closed.append(self), close(self)))
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    elsewhere = tmp_path / "other-shm"
    elsewhere.mkdir()
    for s in servers:  # the servers' RegionMaps look in a directory the gateway's arenas are not in
        monkeypatch.setattr(cluster.expert_servicers[s].regions, "shm_dir", elsewhere)
    # 16 tokens: both servers get a call in the first forward (one-sided routing has odds ~1e-10)
    hidden = np.random.default_rng().standard_normal((16, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = [client.forward(hidden) for _ in range(3)]
    want = reference_forward(tiny_checkpoint, hidden)
    assert all(np.abs(g - want).max() <= 1e-5 for g in got)
    pool = cluster.servicers[gateway].engine.experts.inner.pool
    assert all(not r.shared_kinds for r in pool.members)
    # The refused calls' arenas are dropped, not pooled: a server that failed a call may still write.
    assert released == [] and len(closed) == 2


# --- RunExperts called directly with shared regions ---------------------------------------------------


@pytest.fixture
def server(cluster, tiny_checkpoint):
    return cluster.expert_server(tiny_checkpoint, experts="2-5")


@pytest.fixture
def arena():
    a = Arena(torch.device("cpu"), 1 << 20)
    yield a
    a.close()


def _call(server, request):
    return run_experts(server, request)


def _request(arena, x, ids, weights, **fields):
    """A RunExperts request with `x` in the arena and the result's place after it; `fields` override."""
    arena.view(0, wire.FLOAT32, x.shape).copy_(torch.from_numpy(x))
    out_at = shared_regions.aligned(x.nbytes)
    values = dict(layer=1, expert_ids=wire.encode_view(ids), weights=wire.encode_view(weights),
                  shared_hidden=arena.message(0, wire.FLOAT32, x.shape),
                  shared_output=arena.message(out_at, wire.FLOAT32, x.shape))
    values.update(fields)
    return zerocopy.RunExpertsRequest(**values), out_at


def _inputs(tokens=7):
    rng = np.random.default_rng()
    hidden = rng.standard_normal((tokens, 64), dtype=np.float32)
    ids = rng.integers(2, 6, size=(tokens, 2)).astype(np.int32)
    weights = rng.random((tokens, 2), dtype=np.float32)
    return hidden, ids, weights


def test_run_experts_reads_and_writes_the_region(server, tiny_checkpoint, arena):
    hidden, ids, weights = _inputs()
    request, out_at = _request(arena, hidden, ids, weights)
    reply = _call(server, request)
    assert (reply.output.dtype, reply.output.shape, bytes(reply.output.data)) == (wire.FLOAT32, (7, 64), b"")
    got = arena.view(out_at, wire.FLOAT32, (7, 64)).numpy()
    assert np.abs(got - plain_torch(tiny_checkpoint, 1, hidden, ids, weights)).max() <= 1e-5


def _region(arena, **changes):
    fields = {f.name: getattr(arena.region, f.name) for f in zerocopy.SharedRegion.fields}
    fields.update(changes)
    return zerocopy.SharedRegion(**fields)


BAD = {
    "unknown kind": (lambda a, h: {"shared_hidden": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=_region(a, kind=7))},  # no such RegionKind
        grpc.StatusCode.INVALID_ARGUMENT, "shared_hidden.region.kind"),
    "past the end": (lambda a, h: {"shared_hidden": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=a.region, offset=a.nbytes - 64)},
        grpc.StatusCode.INVALID_ARGUMENT, "do not fit the region"),
    "not our name": (lambda a, h: {"shared_hidden": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=_region(a, name="../etc/passwd"), offset=256)},
        grpc.StatusCode.INVALID_ARGUMENT, "shared_hidden.region.name"),
    "no such region": (lambda a, h: {"shared_hidden": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=_region(a, name="moe-gone"), offset=256)},
        grpc.StatusCode.FAILED_PRECONDITION, "shared_hidden: shared memory 'moe-gone' is not a region this server"),
    "region smaller than said": (lambda a, h: {"shared_hidden": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=_region(a, size=a.nbytes * 2), offset=256)},
        grpc.StatusCode.FAILED_PRECONDITION, "is not a region this server can use"),
    "integer dtype": (lambda a, h: {"shared_output": zerocopy.SharedTensor(
        dtype=wire.INT32, shape=h.shape, region=a.region, offset=a.nbytes // 2)},
        grpc.StatusCode.INVALID_ARGUMENT, "shared_output.dtype"),
    "output shape": (lambda a, h: {"shared_output": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=(h.shape[0] + 1, 64), region=a.region, offset=a.nbytes // 2)},
        grpc.StatusCode.INVALID_ARGUMENT, "shared_output.shape"),
    "bytes and region": (lambda a, h: {"hidden": wire.encode_view(h)},
                         grpc.StatusCode.INVALID_ARGUMENT, "set together with shared_hidden"),
    "name without its key": (lambda a, h: {"shared_hidden": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=_region(a, key=b""), offset=256)},
        grpc.StatusCode.FAILED_PRECONDITION, "shared_hidden: shared memory"),
    "another key": (lambda a, h: {"shared_output": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=_region(a, key=bytes(16)), offset=a.nbytes // 2)},
        grpc.StatusCode.FAILED_PRECONDITION, "shared_output: shared memory"),
    "inside the key header": (lambda a, h: {"shared_output": zerocopy.SharedTensor(
        dtype=wire.FLOAT32, shape=h.shape, region=a.region, offset=0)},
        grpc.StatusCode.INVALID_ARGUMENT, "shared_output.offset: 0 is inside the region's key header"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_shared_fields_are_named_and_the_server_stays_well(server, tiny_checkpoint, arena, case):
    make, code, text = BAD[case]
    hidden, ids, weights = _inputs()
    request, _ = _request(arena, hidden, ids, weights, **make(arena, hidden))
    with pytest.raises(grpc.RpcError) as err:
        _call(server, request)
    assert err.value.code() == code and text in err.value.details(), err.value.details()
    good, out_at = _request(arena, hidden, ids, weights)
    _call(server, good)
    got = arena.view(out_at, wire.FLOAT32, (7, 64)).numpy()
    assert np.abs(got - plain_torch(tiny_checkpoint, 1, hidden, ids, weights)).max() <= 1e-5


def test_a_mapped_region_still_needs_its_key(server, tiny_checkpoint, arena):
    """Once a server has mapped a region, its name alone (listed in /dev/shm by anyone on the host) does not
    reach it: a caller without the key can neither read the hidden states nor write the sums."""
    hidden, ids, weights = _inputs()
    good, out_at = _request(arena, hidden, ids, weights)
    _call(server, good)
    want = arena.view(out_at, wire.FLOAT32, (7, 64)).clone()
    thief = _region(arena, key=secrets.token_bytes(16))
    stolen = zerocopy.RunExpertsRequest(
        layer=1, expert_ids=wire.encode_view(ids), weights=wire.encode_view(weights),
        shared_hidden=zerocopy.SharedTensor(dtype=wire.FLOAT32, shape=hidden.shape, region=thief,
                                            offset=good.shared_hidden.offset),
        shared_output=zerocopy.SharedTensor(dtype=wire.FLOAT32, shape=hidden.shape, region=thief,
                                            offset=good.shared_output.offset))
    with pytest.raises(grpc.RpcError) as err:
        _call(server, stolen)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is not a region this server can use" in err.value.details()
    assert torch.equal(arena.view(out_at, wire.FLOAT32, (7, 64)), want)


def test_server_with_it_off_refuses_shared_requests(cluster, tiny_checkpoint, arena):
    server = cluster.expert_server(tiny_checkpoint, experts="2-5", shared_memory=False)
    hidden, ids, weights = _inputs()
    request, _ = _request(arena, hidden, ids, weights)
    with pytest.raises(grpc.RpcError) as err:
        _call(server, request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shared_hidden" in err.value.details() and "--shared-memory off" in err.value.details()


def test_arena_pool_reuses_and_unlinks():
    pool = ArenaPool(keep=1, most=1)
    a = pool.acquire("s", torch.device("cpu"), 1000)
    pool.release("s", a)
    assert pool.acquire("s", torch.device("cpu"), 2000) is a  # the smallest idle arena that fits
    big = pool.acquire("s", torch.device("cpu"), 3 << 20)
    assert big.nbytes == 4 << 20
    pool.release("s", a)
    pool.release("s", big)  # keep=1: the smaller one goes, its name unlinked
    assert not (shared_regions.SHM_DIR / a.region.name).exists()
    assert (shared_regions.SHM_DIR / big.region.name).exists()
    pool.close()
    assert not (shared_regions.SHM_DIR / big.region.name).exists()


def test_arena_pool_keeps_as_many_as_were_out_at_once():
    """A caller with several calls out per server (calls not waited for) gets the same arenas back forward after
    forward: a dropped one would cost the server a fresh mapping each time."""
    pool = ArenaPool(keep=1)
    cpu = torch.device("cpu")
    try:
        for _ in range(3):
            out = [pool.acquire("s", cpu, 1000) for _ in range(3)]
            names = {a.region.name for a in out}
            for a in out:
                pool.release("s", a)
            assert all((shared_regions.SHM_DIR / name).exists() for name in names)
        assert {a.region.name for a in (pool.acquire("s", cpu, 1000) for _ in range(3))} == names
    finally:
        pool.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (run on the lent GPU hosts)")
def test_forward_through_cuda_ipc(cluster, processes, tiny_checkpoint, tmp_path):
    """The gateway's dense layers on the servers' GPU: the hidden states stay there, and the calls go over
    the same-host channel."""
    servers = gpu_expert_servers(processes, tiny_checkpoint, tmp_path, "float32")
    gateway = cluster.gateway(tiny_checkpoint, [s.address for s in servers], dense_device="cuda:0")
    hidden = np.random.default_rng().standard_normal((2, 9, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-4
    dispatcher = cluster.servicers[gateway].engine.experts.inner
    assert all(r.shared_kinds >= {shared_regions.CUDA} for r in dispatcher.pool.members)
    assert all(r.side_link() is not None for r in dispatcher.pool.members)
    assert dispatcher.routed_rounds >= 2  # the routing stayed on the GPU: device-routed calls, CUDA IPC events


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (run on the lent GPU hosts)")
@pytest.mark.parametrize("side_calls", [True, False])
def test_calls_in_flight_while_graphs_are_captured(loop_thread, processes, tiny_checkpoint, tmp_path, side_calls):
    """bf16 servers replay CUDA graphs, one captured per new call size. Two calls in flight at once (what
    the micro-batch overlap does), each of a size not seen before, once failed the capture with "operation
    not permitted when stream is capturing". Each result equals the checkpoint's experts on the same
    routing: relative RMS error <= 2% (bf16 rounds inputs, weights and the activation: <= 4 roundings of
    2^-8 relative each, fp32 accumulation)."""
    servers = gpu_expert_servers(processes, tiny_checkpoint, tmp_path, "bfloat16")
    checkpoint = Checkpoint(tiny_checkpoint)
    pool = ServerPool([s.address for s in servers], checkpoint.spec, checkpoint.fingerprint())
    loop_thread.run(pool.start(60))
    dispatcher = ExpertDispatcher(checkpoint.spec, pool, loop_thread.loop, wire.BFLOAT16, arenas=ArenaPool(),
                                  side_calls=side_calls)
    try:
        for sizes in ((3, 20), (40, 70), (130, 300)):
            calls = []
            for tokens in sizes:
                weights, ids = route(torch.randn(tokens, 8), 2, True)
                hidden = torch.randn(tokens, 64)
                calls.append((hidden, ids, weights, dispatcher.submit(0, hidden.cuda().bfloat16(), ids.cuda(),
                                                                      weights.cuda())))
            for hidden, ids, weights, call in calls:
                got = call.result().float().cpu().numpy()
                want = plain_torch(tiny_checkpoint, 0, hidden.numpy(), ids.numpy(), weights.numpy())
                assert np.linalg.norm(got - want) <= 0.02 * np.linalg.norm(want)
    finally:
        dispatcher.close()
        loop_thread.run(pool.close())


def test_served_requests_start_their_calls_in_the_dispatcher(cluster, tiny_checkpoint, monkeypatch):
    """Forward through the batcher and the micro-batch overlap (the default) starts each layer's calls in
    ExpertDispatcher.submit, the one place that chooses where the tensors start from (a GPU's memory for
    CUDA IPC). An earlier overlap path copied the hidden states to the host before it."""
    seen = []
    submit = ExpertDispatcher.submit

    def recording(self, layer, hidden, expert_ids, weights):
        seen.append(layer)
        return submit(self, layer, hidden, expert_ids, weights)

    monkeypatch.setattr(ExpertDispatcher, "submit", recording)
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers)
    hidden = np.random.default_rng().standard_normal((3, 7, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    assert sorted(seen) == [0, 1]  # both MoE layers, once each


def test_views_kept_for_reuse_are_writable_in_and_out_of_inference_mode():
    """Arenas and the servers' mappings keep their views from call to call; a view made under inference mode
    cannot be written outside it, so each mode gets its own (the gateway's model runs in both)."""
    arena = Arena(torch.device("cpu"), 1 << 16)
    maps = RegionMaps([SHM])
    try:
        for first_in_inference in (True, False):
            values = torch.randn(3, 5)
            with torch.inference_mode(first_in_inference):
                arena.view(256, wire.FLOAT32, (3, 5)).copy_(values)
                maps.tensor(arena.message(256, wire.FLOAT32, (3, 5)), "shared_hidden").mul_(2)
            with torch.inference_mode(not first_in_inference):
                arena.view(256, wire.FLOAT32, (3, 5)).add_(1)
                got = maps.tensor(arena.message(256, wire.FLOAT32, (3, 5)), "shared_hidden").clone()
            assert torch.equal(got, values * 2 + 1)
    finally:
        arena.close()
