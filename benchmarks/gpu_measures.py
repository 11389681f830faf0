"""What benchmarks/gpu_model.py measures beside tokens/s: the memory-bandwidth bound of a decode step, one
expert call's host overhead, a profile of a decode step, and Generate streams through the gateway's API.

Legend: B = sequences decoding, H = hidden size, E = routed experts, K = top-k, V = vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

from moe_serve.core.routing import route


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s a device-to-device copy moves, counting the read and the write (what a kernel that streams
    weights can reach); median over repeats."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a layer runs for `batch` tokens routed uniformly (top_k of num_experts each)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_step_bytes(spec, batch: int, context: int, itemsize: int = 2) -> dict:
    """Bytes one decode step of `batch` sequences must read at least: every dense weight (attention,
    shared experts, dense MLPs, the LM head), the routed experts the batch touches, and the KV cache."""
    h = spec.hidden_size
    attn = h * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim + spec.num_heads * spec.head_dim * h
    moe = len(spec.moe_layers)
    dense_layers = spec.num_layers - moe
    dense = (spec.num_layers * attn + moe * (3 * h * spec.shared_expert_width + spec.num_experts * h)
             + dense_layers * 3 * h * spec.dense_width + spec.vocab_size * h + batch * h) * itemsize
    experts = moe * experts_touched(spec.num_experts, spec.top_k, batch) * 3 * h * spec.expert_width * itemsize
    kv = spec.num_layers * 2 * batch * context * spec.num_kv_heads * spec.head_dim * itemsize
    return {"dense": dense, "experts": experts, "kv_cache": kv, "total": dense + experts + kv}


def bound_tokens_per_s(spec, batch: int, context: int, bandwidth: float) -> float:
    """Decode tokens/s if a step cost only its bytes at `bandwidth`."""
    return batch / (decode_step_bytes(spec, batch, context)["total"] / bandwidth)


def expert_call_ms(experts, spec, device: str, tokens: int = 64, repeats: int = 50) -> float:
    """Median ms of one MoE layer's routed-expert call at `tokens` decode tokens (DeepSeek routing, random
    input on `device`), synchronised: the served round trip, or the compute alone for an in-process bank."""
    layer = spec.moe_layers[len(spec.moe_layers) // 2]
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    hidden = torch.randn(tokens, spec.hidden_size, generator=gen).to(device, torch.bfloat16)
    weights, ids = route(torch.randn(tokens, spec.num_experts, generator=gen), spec.top_k, spec.norm_topk_prob)
    ids, weights = ids.to(device), weights.to(device)
    times = []
    for i in range(repeats + 5):
        torch.cuda.synchronize(device) if device.startswith("cuda") else None
        start = time.perf_counter()
        out = experts.run(layer, hidden, ids, weights)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def profile_step(step, device: str, rows: int = 30) -> dict:
    """torch.profiler over one call of `step()` (after one warm call): see profile_region."""
    step()  # warm: graphs captured, caches allocated
    return profile_region(lambda around: _around_all(step, around), device, rows)


def _around_all(step, around) -> None:
    with around():
        step()


def profile_region(run, device: str, rows: int = 30) -> dict:
    """torch.profiler over the part of `run(around)` that runs inside `with around():` (e.g. decode steps
    without their prefill): wall ms, and the ops with the most self CPU and self device time (ms), so a step's
    time splits into host work, kernels and waiting."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    held: dict = {}

    @contextlib.contextmanager
    def around():
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            yield
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            held["wall"] = time.perf_counter() - start
        held["events"] = prof.key_averages()

    run(around)
    events = held["events"]

    def top(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
        return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in ranked]

    return {"wall_ms": held["wall"] * 1e3,
            "self_cpu_ms_total": sum(e.self_cpu_time_total for e in events) / 1e3,
            "self_device_ms_total": sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3,
            "top_cpu": top("self_cpu_time_total"), "top_device": top("self_device_time_total")}


def generate_streams(address: str, vocab: int, streams: int, prompt_len: int, new_tokens: int,
                     timeout: float = 600.0) -> dict:
    """`streams` concurrent greedy Generate calls through the gateway's gRPC API, made from a process of their
    own (benchmarks/stream_clients.py: client threads in the gateway's process would take its GIL from the
    model thread): generated tokens/s over the whole run, and inter-token latency p50 / p99 in ms."""
    argv = [sys.executable, "-m", "benchmarks.stream_clients", address, str(vocab), str(streams), str(prompt_len),
            str(new_tokens), str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"stream clients failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
