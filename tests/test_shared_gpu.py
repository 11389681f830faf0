"""gateway/shared_gpu: micro-batch overlap stays on unless an expert server computes on the dense layers' GPU
and no MPS daemon is there; --overlap / --no-overlap always win. Servers announce their GPUs in GetInfo."""

from types import SimpleNamespace

import pytest
import torch

from moe_client.pb import experts_pb2
from moe_serve.gateway.shared_gpu import choose_overlap, mps_daemon_present, servers_sharing

GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"


def server(name: str, *uuids: str):
    return SimpleNamespace(name=name, info=experts_pb2.GetInfoResponse(compute_gpu_uuids=list(uuids)))


CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(("members", "mps", "want"), [
    ([server("a", GPU_B), server("b")], False, True),  # others' GPUs and the CPU: nothing shared
    ([server("a", GPU_A), server("b", GPU_B)], False, False),  # a shares ours, no MPS: off
    ([server("a", GPU_B, GPU_A)], True, True),  # shared, but under MPS: on
])
def test_gateway_chooses_by_the_gpus_its_servers_compute_on(members, mps, want):
    on, why = choose_overlap(None, CUDA, members, gpu_uuid=GPU_A, mps=mps)
    assert on == want
    if not want:
        assert "a" in why and GPU_A in why and "MPS" in why
    assert servers_sharing(GPU_A, members) == [m.name for m in members if GPU_A in m.info.compute_gpu_uuids]


def test_overlap_is_off_where_every_call_goes_unwaited(monkeypatch):
    """Calls not waited for leave overlap nothing to hide: off, whatever the GPUs and MPS; a server on another
    host, one without done_signals, or a replicated expert gets waited-for calls, so the choice falls back to the
    GPUs."""
    from moe_serve.gateway import shared_gpu
    from moe_serve.rpc import shared_regions, stream_signals

    here = shared_regions.host_id()
    monkeypatch.setattr(stream_signals, "available", lambda device: device.type == "cuda")

    def signalling(name: str, host: str = here, done: bool = True):
        return SimpleNamespace(name=name, info=experts_pb2.GetInfoResponse(compute_gpu_uuids=[GPU_B], host_id=host,
                                                                           done_signals=done))

    def pool(members, replicated_layer: int | None = None):
        plans = {layer: None if layer == replicated_layer else {} for layer in (1, 3)}
        return SimpleNamespace(members=members, spec=SimpleNamespace(moe_layers=[1, 3]), sole_plan=plans.get)

    local = [signalling("a"), signalling("b")]
    assert shared_gpu.calls_go_unwaited(True, CUDA, pool(local))
    on, why = choose_overlap(None, CUDA, local, gpu_uuid=GPU_A, mps=True, unwaited=True)
    assert not on and "unwaited" in why
    assert choose_overlap(True, CUDA, local, gpu_uuid=GPU_A, mps=True, unwaited=True)[0]  # the flag still wins
    assert not shared_gpu.calls_go_unwaited(False, CUDA, pool(local))  # --no-pipelined-calls
    assert not shared_gpu.calls_go_unwaited(True, torch.device("cpu"), pool(local))
    assert not shared_gpu.calls_go_unwaited(True, CUDA, pool([*local, signalling("far", host="elsewhere")]))
    assert not shared_gpu.calls_go_unwaited(True, CUDA, pool([*local, signalling("old", done=False)]))
    assert not shared_gpu.calls_go_unwaited(True, CUDA, pool(local, replicated_layer=3))  # waited for there
    assert not shared_gpu.calls_go_unwaited(True, CUDA, pool([]))


def test_the_gateway_warns_of_context_switches_only_on_a_shared_gpu_without_mps():
    from moe_serve.gateway.shared_gpu import context_switch_warning

    shared = [server("sharer", GPU_A), server("elsewhere", GPU_B)]
    warning = context_switch_warning(CUDA, shared, gpu_uuid=GPU_A, mps=False)
    assert warning and "sharer" in warning and "elsewhere" not in warning and GPU_A in warning
    assert "nvidia-cuda-mps-control" in warning
    assert context_switch_warning(CUDA, shared, gpu_uuid=GPU_A, mps=True) is None
    assert context_switch_warning(CUDA, shared[1:], gpu_uuid=GPU_A, mps=False) is None
    assert context_switch_warning(torch.device("cpu"), shared, gpu_uuid=GPU_A, mps=False) is None


def test_flags_and_the_cpu_override_the_choice():
    shared = [server("a", GPU_A)]
    assert choose_overlap(True, CUDA, shared, gpu_uuid=GPU_A, mps=False)[0]
    assert not choose_overlap(False, torch.device("cpu"), [], gpu_uuid=GPU_A, mps=True)[0]
    assert choose_overlap(None, torch.device("cpu"), shared)[0]  # dense layers on the CPU share no GPU


def test_mps_daemon_is_found_where_cuda_would_look(tmp_path):
    assert not mps_daemon_present({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    (tmp_path / "control").touch()
    assert mps_daemon_present({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})


def test_a_cpu_server_announces_no_gpu(cluster, tiny_checkpoint):
    address = cluster.expert_server(tiny_checkpoint)
    info = cluster.expert_servicers[address].info
    assert list(info.compute_gpu_uuids) == [] and list(info.devices) == ["cpu"]
