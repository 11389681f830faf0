"""One MoE layer's expert call between two processes on one host: where the time goes besides the compute.

A real `moe-expert-server` process owns every expert of one DeepSeek-MoE-16B-shaped layer (64 experts of
width 1408, top-6, bf16 on a GPU, fp32 on the CPU); this process is the gateway (its ExpertDispatcher
and pool). For each token count, interleaved, medians over repeats:
  - in-process: the same bank in this process (ExpertBank.compute): the compute alone;
  - same-host channel: hidden states and sums in shared memory (CUDA IPC with --device cuda), the call
    over the Unix socket from this thread (rpc/side_channel.py), what the gateway does by default;
  - same-host channel, host-routed (GPU): the routing brought to the host and planned there (what every
    call did before device-routed calls): the caller and the server each wait for the GPU once a call;
  - gRPC + shared memory: the same, the call by gRPC through the event loops (--no-same-host-calls);
  - (GPU) same-host channel, host memory: the caller's tensors in /dev/shm, the server copying them to
    its GPU and back: the caller never touches the GPU;
and the host overhead of the channel: its round trip minus the compute the server reports doing. Each
variant is also timed as a chain of CHAIN calls, each on the previous one's output with no wait in
between (a decode step's 27 MoE layers, without the dense work): a device-routed call lets the host
run ahead of the GPU there, so per call it costs the larger of the host's and the GPU's time, not
their sum. On a GPU the chain also runs unwaited (gateway/pipelined_calls.py): the host does not wait
for each reply either, only for all of them at the chain's end (as at a model's last MoE layer), so
the gateway's host, the server's host and the GPU each work on a different call at once.
Goal (issue 14): <= 0.3 ms at 64 decode tokens.

    python -m benchmarks.call_overhead --device cuda --out docs/bench/call-overhead-h200.json
    python -m benchmarks.call_overhead --device cpu --width 16 --tokens 1,64 --repeats 200  # the 2-core machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks import machine
from benchmarks.model import LAYER, Shape, ensure_checkpoint, make_input
from benchmarks.mps import client_state, rerun_under_mps
from benchmarks.procs import ENV, bench_loop
from moe_client import wire
from moe_serve.core.routing import route
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.pool import PoolOptions, ServerPool
from moe_serve.gateway.side_dispatch import SideRound
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.shared_regions import ArenaPool
from tests.support.launch import launch
from tests.support.ports import free_port


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 3):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return times


CHAIN = 27  # DeepSeek-MoE-16B's MoE layers


def chained(call, hidden: torch.Tensor, end=None):
    """CHAIN calls, each on the previous one's output (cast to the input's dtype), without waiting between;
    then `end()` if given."""
    def run() -> None:
        h = hidden
        for _ in range(CHAIN):
            h = call(h).to(hidden.dtype)
        if end is not None:
            end()
    return run


def measure(tokens: int, shape: Shape, args, bank: ExpertBank, dispatchers: dict, torch_dtype) -> dict:
    """Every variant at `tokens` tokens, interleaved in 4 rounds (load changes hit each alike)."""
    hidden = make_input(shape, tokens).to(args.device, torch_dtype)
    weights, ids = route(torch.randn(tokens, shape.experts), shape.top_k, False)
    ids, weights = ids.to(args.device), weights.to(args.device)
    server_seconds: list[float] = []

    def channel():
        call = dispatchers["same-host channel"].submit(LAYER, hidden, ids, weights)
        call.result()
        if isinstance(call, SideRound):
            server_seconds.append(call.server_seconds)

    variants = {"in-process": lambda: bank.compute(LAYER, hidden, ids, weights, on_device=True),
                "same-host channel": channel,
                "gRPC + shared memory": lambda: dispatchers["gRPC + shared memory"].run(LAYER, hidden, ids, weights)}
    chains = {"in-process": lambda h: bank.compute(LAYER, h, ids, weights, on_device=True),
              "same-host channel": lambda h: dispatchers["same-host channel"].run(LAYER, h, ids, weights)}
    if args.device.startswith("cuda"):
        # The caller's tensors in host memory (/dev/shm): the caller never touches the GPU, so the GPU does not
        # switch between this process's context and the server's on every call.
        host = (hidden.cpu(), ids.cpu(), weights.cpu())
        variants["same-host channel, host memory"] = lambda: dispatchers["same-host channel"].run(LAYER, *host)
        host_routed = dispatchers["same-host channel, host-routed"]
        variants["same-host channel, host-routed"] = lambda: host_routed.run(LAYER, hidden, ids, weights)
        chains["same-host channel, host-routed"] = lambda h: host_routed.run(LAYER, h, ids, weights)
        unwaited = dispatchers["same-host channel, unwaited"]
        unwaited.pending.last_layer = -1  # the layer is the checkpoint's only one: read the replies at the end
        unwaited.pending.first_layer = -1  # ... and each call of the chain is of that layer, yet one forward
        chains["same-host channel, unwaited"] = lambda h: unwaited.run(LAYER, h, ids, weights)
    for name, call in chains.items():
        end = dispatchers[name].pending.settle if name.endswith("unwaited") else None
        variants[f"chain of {CHAIN}: {name}"] = chained(call, hidden, end)
    times: dict[str, list[float]] = {name: [] for name in variants}
    # The server's own view, from its metrics: whole handling of a call (decode to reply) and compute alone.
    handled = {name: [0.0] * 5 for name in variants}  # handling, compute, prepare, finish seconds; calls
    for _ in range(4):
        for name, fn in variants.items():
            before = server_seconds_so_far(args.metrics_url)
            times[name] += timed(fn, args.device, args.repeats // 4)
            after = server_seconds_so_far(args.metrics_url)
            handled[name] = [h + a - b for h, a, b in zip(handled[name], after, before, strict=True)]
    med = {name: statistics.median(ts) * 1e3 / (CHAIN if name.startswith("chain") else 1)
           for name, ts in times.items()}  # chains: per call
    server_ms = statistics.median(server_seconds) * 1e3 if server_seconds else float("nan")
    server_view = {name: {"handling_ms": h / n * 1e3, "compute_ms": c / n * 1e3, "prepare_ms": pr / n * 1e3,
                          "finish_ms": f / n * 1e3}
                   for name, (h, c, pr, f, n) in handled.items() if n}
    row_profile = caller_profile(channel, args.device) if args.profile else None
    return {"tokens": tokens, "median_ms": med, "server_compute_ms": server_ms,
            "channel_overhead_ms": med["same-host channel"] - server_ms,
            "grpc_overhead_ms": med["gRPC + shared memory"] - server_ms, "server_mean_ms": server_view,
            "caller_profile": row_profile}


def caller_profile(call, device: str, calls: int = 50) -> list[dict]:
    """torch.profiler over `calls` channel calls in this (the caller's) process: the ops and CUDA runtime
    calls that take its host time, by self time per call (top 25)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for _ in range(5):
        call()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        sync(device)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return [{"op": e.key, "count_per_call": e.count / calls, "self_cpu_us_per_call": e.self_cpu_time_total / calls,
             "cpu_us_per_call": e.cpu_time_total / calls} for e in rows]


def server_seconds_so_far(url: str) -> list[float]:
    """(RunExperts handling, expert compute, prepare and finish seconds, calls) the server has counted since it
    started."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    handling = _sample(text, 'moe_request_duration_seconds_sum{rpc="RunExperts"}')
    calls = _sample(text, 'moe_request_duration_seconds_count{rpc="RunExperts"}')
    compute = _sample(text, f'moe_expert_compute_seconds_sum{{layer="{LAYER}"}}')
    prepare = _sample(text, 'moe_expert_call_stage_seconds_sum{stage="prepare"}')
    finish = _sample(text, 'moe_expert_call_stage_seconds_sum{stage="finish"}')
    return [handling, compute, prepare, finish, calls]


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def layer_server(shape: Shape, device: str, dtype: str, checkpoints: str, **flags):
    """A real `moe-expert-server` process owning every expert of `shape`'s layer (checkpoint made if missing),
    and this process's pool of it: yields (checkpoint, server process, pool, loop); all stopped on the way out."""
    ckpt_dir = ensure_checkpoint(shape, Path(checkpoints))
    checkpoint = Checkpoint(ckpt_dir)
    workdir = Path(tempfile.mkdtemp(prefix="layer-server-"))
    server = launch("expert-server", workdir / "server.log", env=ENV, die_with_parent=True, checkpoint=ckpt_dir,
                    devices=device, dtype=dtype, name="experts", log_level="WARNING", **flags)
    loop = bench_loop()
    try:
        server.wait_ready(900)
        pool = ServerPool([server.address], checkpoint.spec, checkpoint.fingerprint(), PoolOptions(rpc_timeout=900))
        loop.run(pool.start(900))
        try:
            yield checkpoint, server, pool, loop
        finally:
            loop.run(pool.close())
    finally:
        server.stop(60)
        loop.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", default="1,8,64,256,4096")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--checkpoints", default="bench-results")
    p.add_argument("--width", type=int, default=1408,
                   help="expert width; a small one (e.g. 16) leaves the call's own cost visible on a CPU")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the channel calls of each token "
                   "count in this process: the caller's host time by op and CUDA runtime call")
    p.add_argument("--mps", action="store_true", help="run the gateway and server as clients of an MPS daemon of "
                   "the run's own (benchmarks/mps.py): one GPU context instead of time-sliced ones")
    p.add_argument("--mps-client", action="store_true", help=argparse.SUPPRESS)  # --mps's own run, under the daemon
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.mps:
        rerun_under_mps("benchmarks.call_overhead", args.out)
    shape = Shape(width=args.width)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    metrics_port = free_port()
    args.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    served = layer_server(shape, args.device, dtype, args.checkpoints, metrics_port=metrics_port)
    with served as (checkpoint, _, pool, loop):
        dispatchers = {name: ExpertDispatcher(checkpoint.spec, pool, loop.loop, wire.dtype_from_name(dtype), 900.0,
                                              arenas=ArenaPool(), side_calls=local, device_routing=routing,
                                              pipelined_calls=name.endswith("unwaited"))
                       for name, local, routing in (("same-host channel", True, None),
                                                    ("same-host channel, unwaited", True, None),
                                                    ("same-host channel, host-routed", True, False),
                                                    ("gRPC + shared memory", False, None))}
        bank = ExpertBank.load(checkpoint, {LAYER: tuple(range(shape.experts))}, [torch.device(args.device)],
                               torch_dtype)
        result = {"machine": machine.describe(), "device": args.device, "dtype": dtype, "shape": shape.__dict__,
                  "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                  "same_host_channel": pool.members[0].side_link() is not None, "rows": []}
        if args.mps_client:  # CUDA has started here and in the server: an MPS server must be running for them
            result["mps"] = client_state()
        print(f"{'tokens':>6} {'in-process':>11} {'channel':>9} {'gRPC':>9} {'server':>9} {'overhead':>9}  (ms)")
        for tokens in [int(t) for t in args.tokens.split(",")]:
            row = measure(tokens, shape, args, bank, dispatchers, torch_dtype)
            result["rows"].append(row)
            med = row["median_ms"]
            print(f"{tokens:>6} {med['in-process']:>11.3f} {med['same-host channel']:>9.3f} "
                  f"{med['gRPC + shared memory']:>9.3f} {row['server_compute_ms']:>9.3f} "
                  f"{row['channel_overhead_ms']:>9.3f}", flush=True)
            print(f"        per call (ms): {json.dumps({k: round(v, 3) for k, v in med.items()})}", flush=True)
            print(f"        server side (mean ms): {json.dumps(row['server_mean_ms'])}", flush=True)
            for op in row["caller_profile"] or []:
                print(f"        caller {op['op'][:60]:<60} x{op['count_per_call']:<5.1f} self "
                      f"{op['self_cpu_us_per_call']:8.1f} us/call", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        for d in dispatchers.values():
            d.close()


if __name__ == "__main__":
    main()
