"""DeepSeek-MoE-16B at full shape on GPUs: gateway + expert servers over gRPC vs one process vs transformers.

Writes a random bf16 checkpoint with DeepSeek-MoE-16B's config (28 layers, hidden 2048, 64 routed
experts of width 1408, top-6, 2 shared experts, vocab 102400; ~16.4 B parameters, ~33 GB), then:
  1. expert servers as real `moe_serve.expert_server.main` processes, one per GPU (and 1 / 4 servers
     for the scaling rows), the gateway's dense layers on cuda:0 in this process, wire dtype bf16;
  2. the same model in one process on one GPU (dense layers + all 64 experts on cuda:0, no gRPC);
  3. transformers' Qwen2-MoE at Qwen1.5-MoE-A2.7B's shape on one GPU, random weights.
For each: prefill tokens/s (8 prompts x 512 tokens in one step) and decode tokens/s (64 sequences,
one token each per step, greedy on the GPU), medians over repeats; distributed logits checked against
the one-process run. The gateway reaches its same-host servers through CUDA IPC (the hidden states
stay in GPU memory; gRPC carries the call); a `t` after a server count (`2t`) turns that off, so every
tensor crosses loopback TCP as message bytes; a `b` (`2b`) has the servers write their sums in bf16
instead of float32 (the comparison behind the float32 default). An `r` (`4r`) replicates each layer's hottest experts
(their load counted over the benchmark's own prompts in the first row) onto the servers that carry the
least of that layer's load; the gateway's pool then balances each call over the replicas. An `o` (`2o`)
runs every step as the gateway serves it: two micro-batches taking turns on the dense layers, each one's
RunExperts calls in flight while the other computes (gateway/overlap.py), and its gateway's Generate streams
overlapped too (other rows leave that to the gateway's own choice, gateway/shared_gpu.py). Same-host servers are called
over their same-host channel (rpc/side_channel.py); a `g` (`1g`) calls them by gRPC instead. With dense
layers on a GPU the calls are device-routed (the routing stays on the GPU, no host wait: rpc/gpu_events.py);
an `h` (`1h`) brings the routing to the host at every MoE layer instead, as before; a `w` (`1w`) keeps it
device-routed but waits for every reply (--no-pipelined-calls: gateway/pipelined_calls.py). Each row
also records one expert call's time at 64 decode tokens (served: the round trip; one process: the
compute alone), decode at every --decode-batches size against the memory-bandwidth bound (the bytes a
step must read over the copy bandwidth measured first), --streams concurrent Generate streams through
the gateway's API, and with --profile a torch.profiler breakdown of one decode step. Prints a
table; writes JSON after every row (a run cut short keeps what it measured; a failed row is recorded).

    python -m benchmarks.gpu_model --servers 2,2t,1 --out results.json      # on a 2-GPU host
    python -m benchmarks.gpu_model --servers 1,2,4,4r,2t --out results.json  # on a 4-GPU host
    python -m benchmarks.gpu_model --servers 2,2o --out results.json          # overlap against none
    python -m benchmarks.gpu_model --servers 1,1o,1g,1t --decode-batches 1,8,64,256 --streams 1,8,64 --profile
    python -m benchmarks.gpu_model --servers 1,1h,1o --decode-graphs --decode-batches 1,8,64,256  # routing
    python -m benchmarks.gpu_model --servers 1,1w,1h --decode-graphs --decode-batches 1,8,64,256  # unwaited
    python -m benchmarks.gpu_model --tiny --device cpu --servers 2,2r     # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from benchmarks.gpu_measures import (
    bound_tokens_per_s,
    copy_bandwidth,
    decode_step_bytes,
    expert_call_ms,
    generate_streams,
    profile_region,
)
from benchmarks.model_shapes import DEEPSEEK_MOE_16B, QWEN15_MOE_A27B
from benchmarks.mps import client_state, rerun_under_mps
from benchmarks.timing import synced_times, synchronize
from moe_client import wire
from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.decode_step import DecodeStep
from moe_serve.expert_server.bank import ExpertBank, InProcessExperts
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.gateway.config import GatewayConfig
from moe_serve.gateway.main import create_gateway
from moe_serve.gateway.overlap import PingPong
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import spec_from_config
from moe_serve.model.loader import load_dense_model
from moe_serve.model.placement import balanced_assignment, placement_entries, resolve_ownership, write_placement
from moe_serve.model.tensor_shapes import dense_tensor_shapes
from moe_serve.process.threads import set_torch_threads
from moe_serve.rpc.shared_regions import kind_names
from tests.support.launch import ServiceProcess, launch, stop_all
from tests.support.threads import LoopThread


def write_checkpoint(path: Path, config: dict, seed: int, device: str) -> None:
    """Random weights (std 1/sqrt(fan_in); norms 1), one shard per layer, with an index file."""
    spec = spec_from_config(config)
    torch.manual_seed(seed)
    shapes = dict(dense_tensor_shapes(spec))
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            g, u, d = spec.expert_names(layer, e)
            shapes.update({g: (spec.expert_width, spec.hidden_size), u: (spec.expert_width, spec.hidden_size),
                           d: (spec.hidden_size, spec.expert_width)})
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        shard = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            scale = 0.02 if "embed" in name or "lm_head" in name else shape[-1] ** -0.5
            t = (torch.randn(shape, device=device, dtype=torch.bfloat16) * scale).cpu()
        shards.setdefault(shard, {})[name] = t
    weight_map = {}
    for shard, tensors in shards.items():
        fname = f"model-{shard}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))


class LoadCounter:
    """ExpertBackend wrapper counting routed (token, expert) pairs per layer while `counting` is on."""

    def __init__(self, experts, num_experts: int):
        self.experts, self.num_experts = experts, num_experts
        self.counting = False
        self.loads: dict[int, torch.Tensor] = {}

    def run(self, layer, hidden, expert_ids, weights):
        if self.counting:
            ids = expert_ids[expert_ids >= 0].cpu()
            load = torch.bincount(ids, minlength=self.num_experts)
            self.loads[layer] = self.loads.get(layer, torch.zeros_like(load)) + load
        return self.experts.run(layer, hidden, expert_ids, weights)


def replicated_ownership(spec, count: int, loads: dict[int, torch.Tensor], replicas: int) -> list[dict]:
    """Even split over `count` servers, plus each layer's `replicas` hottest experts copied once more, each
    onto the server (not already holding it) that then carries the least of the layer's load.

    A replicated expert's load is counted half on each holder: the pool's least-outstanding-work choice
    splits calls between them.
    """
    owned = [{layer: set(ids) for layer, ids in o.items()} for o in balanced_assignment(spec, count)]
    for layer in spec.moe_layers:
        load = loads[layer].double()
        per_server = [float(sum(load[e] for e in owned[s].get(layer, ()))) for s in range(count)]
        for expert in load.argsort(descending=True)[:replicas].tolist():
            holder = next(s for s in range(count) if expert in owned[s].get(layer, ()))
            target = min((s for s in range(count) if s != holder), key=lambda s: per_server[s], default=None)
            if target is None:
                break
            owned[target].setdefault(layer, set()).add(expert)
            per_server[holder] -= float(load[expert]) / 2
            per_server[target] += float(load[expert]) / 2
    return [{layer: tuple(sorted(ids)) for layer, ids in o.items()} for o in owned]


def imbalance(owned: list[dict], loads: dict[int, torch.Tensor]) -> float:
    """Mean over layers of (busiest server's pairs / mean per server), replicated experts split evenly."""
    ratios = []
    for layer, load in loads.items():
        holders = torch.zeros_like(load, dtype=torch.float64)
        for o in owned:
            holders[list(o.get(layer, ()))] += 1
        per_server = [float((load.double() / holders)[list(o.get(layer, ()))].sum()) for o in owned]
        ratios.append(max(per_server) / (sum(per_server) / len(per_server)))
    return statistics.mean(ratios)


def start_servers(checkpoint: Path, owned: list[dict], devices: list[str], row: int,
                  spec, workdir: Path) -> tuple[list[ServiceProcess], list[str], Path]:
    """One expert server process per ownership (server i on devices[i % len]) on free ports, through a
    placement file; `row` numbers the row's placement file and logs."""
    placement = workdir / f"placement-row{row}.json"
    procs = [launch("expert-server", workdir / f"expert-row{row}-{i}.log", start=False,
                    checkpoint=checkpoint, placement=placement, name=f"server{i}", devices=devices[i % len(devices)],
                    dtype="bfloat16") for i in range(len(owned))]
    addresses = [p.address for p in procs]
    write_placement(placement, placement_entries(spec, owned, addresses, [p.label for p in procs]))
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready(900)
    except BaseException:
        stop_all(procs, 60)
        raise
    return procs, addresses, placement


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds per call, each synchronised with `device`, after 2 warm-up calls."""
    return statistics.median(synced_times(fn, [device], repeats, warmup=2))


def prefill_prompts(spec, args) -> list[torch.Tensor]:
    """The benchmark's prompts (seeded: every row and the load count see the same tokens)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, spec.vocab_size, (args.prefill_len,), generator=gen) for _ in range(args.prefill_batch)]


def in_parts(pingpong: PingPong | None, experts, count: int, part) -> list:
    """part(lo, hi, backend) -> list over items [lo, hi): all at once over `experts`, or with `pingpong` as two
    micro-batches (halves) taking turns on the dense layers while the other's expert calls are out, as
    the gateway's batcher and scheduler run a step."""
    if pingpong is None or count < 2:
        return part(0, count, experts)
    cut = count // 2
    (first, second), _ = pingpong.run([lambda b: part(0, cut, b), lambda b: part(cut, count, b)])
    return first + second


def ours_prefill_decode(model: CausalLM, experts, args, pingpong: PingPong | None = None) -> dict:
    """Prefill and decode tokens/s of the moe-serve model code over `experts`, greedy on the model's device;
    with `pingpong`, every step as two overlapped micro-batches. Decode at every --decode-batches size."""
    prompts = prefill_prompts(model.spec, args)

    @torch.inference_mode()
    def prefill():
        caches = model.new_caches([args.prefill_len] * len(prompts))
        return in_parts(pingpong, experts, len(prompts),
                        lambda lo, hi, b: model.forward(prompts[lo:hi], caches[lo:hi], b, last_only=True))

    t_prefill = timed(prefill, args.repeats, args.device)
    row = {"prefill_tokens_per_s": args.prefill_batch * args.prefill_len / t_prefill,
           "prefill_step_ms": t_prefill * 1e3, "decode": {}}
    ways = {"decode": False, "decode_staged": True} if args.decode_graphs else {"decode": False}
    for key, staged in ways.items():
        row[key] = {}
        for batch in sorted({args.decode_batch, *args.decode_batches}):
            run = decode_run(model, experts, args, prompts, batch, pingpong, staged=staged)
            run()  # warm-up: CUDA graphs of every (layer, bucket) (and with `staged`, of every stage) captured
            seconds = statistics.median(run() for _ in range(args.repeats))
            row[key][batch] = {"tokens_per_s": batch * args.decode_steps / seconds,
                               "step_ms": seconds / args.decode_steps * 1e3}
            if args.bandwidth:
                bound = bound_tokens_per_s(model.spec, batch, args.decode_prompt + args.decode_steps // 2,
                                           args.bandwidth)
                row[key][batch].update(bound_tokens_per_s=bound, share_of_bound=row[key][batch]["tokens_per_s"] / bound)
    row["decode_tokens_per_s"] = row["decode"][args.decode_batch]["tokens_per_s"]
    row["decode_step_ms"] = row["decode"][args.decode_batch]["step_ms"]
    if args.decode_graphs:
        row["decode_staged_tokens_per_s"] = row["decode_staged"][args.decode_batch]["tokens_per_s"]
    if args.profile:
        run = decode_run(model, experts, args, prompts, args.decode_batch, pingpong, steps=2,
                         staged=args.decode_graphs)
        run()  # warm: this batch's graphs captured
        row["decode_2_steps_profile"] = profile_region(run, args.device)
    row["logits"] = [t.float().cpu() for t in prefill()]
    return row


def decode_run(model: CausalLM, experts, args, prompts, batch: int, pingpong: PingPong | None, steps: int = 0,
               staged: bool = False):
    """A function that prefills `batch` sequences, then times `steps` (default --decode-steps) greedy decode
    steps of all of them at once; returns the steps' seconds. Its `around` (a context manager factory, e.g.
    a profiler's) encloses the steps only. `staged`: each step through core.decode_step.DecodeStep (on a GPU
    its dense stages replay CUDA graphs, the host calls the experts between them), as the gateway's
    scheduler runs decode-only steps with --decode-graphs; else model.forward_hidden, eager."""
    steps = steps or args.decode_steps
    pool = model.new_pool(batch, args.decode_prompt + steps)  # one pool for every run: captured graphs stay valid
    stagers: dict[int, DecodeStep] = {}  # one per micro-batch (its own buffers), as the scheduler keeps them

    @torch.inference_mode()
    def decode(around=contextlib.nullcontext):
        caches = [pool.allocate() for _ in range(batch)]
        starts = [p[: args.decode_prompt] for p in (prompts * batch)[:batch]]
        lengths = [args.decode_prompt] * batch
        h = model.forward_hidden(model.embed(torch.cat(starts)), caches, lengths, experts)
        tokens = F.linear(h.view(batch, args.decode_prompt, -1)[:, -1], model.lm_head).argmax(-1)

        def step(last: torch.Tensor, lo: int, hi: int, backend) -> list[torch.Tensor]:
            if staged:
                if lo not in stagers:  # made once: each makes a CUDA stream and a graph memory pool
                    stagers[lo] = DecodeStep(model, pool)
                return [stagers[lo].run(last[lo:hi], caches[lo:hi], backend)]
            return [model.forward_hidden(model.embed(last[lo:hi]), caches[lo:hi], [1] * (hi - lo), backend)]

        try:
            synchronize([args.device])
            with around():
                start = time.perf_counter()
                for _ in range(steps):
                    h = torch.cat(in_parts(pingpong, experts, batch, partial(step, tokens)))
                    tokens = F.linear(h, model.lm_head).argmax(-1)
                synchronize([args.device])
                return time.perf_counter() - start
        finally:
            for cache in caches:
                cache.release()

    return decode


def transformers_qwen(args, device: str) -> dict:
    """Qwen2-MoE at Qwen1.5-MoE-A2.7B's shape (--tiny: shrunk as ours) in transformers, same measurements."""
    from transformers import DynamicCache, Qwen2MoeConfig, Qwen2MoeForCausalLM

    shape = dict(QWEN15_MOE_A27B)
    if args.tiny:
        shape.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                     shared_expert_intermediate_size=512, num_hidden_layers=4, vocab_size=1000)
    config = Qwen2MoeConfig(**shape)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2MoeForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (args.prefill_batch, args.prefill_len), device=device)

    @torch.inference_mode()
    def prefill():
        return model(input_ids=ids, logits_to_keep=1).logits

    t_prefill = timed(prefill, args.repeats, args.device)

    @torch.inference_mode()
    def decode():
        start_ids = ids.repeat(args.decode_batch // args.prefill_batch + 1, 1)[: args.decode_batch,
                                                                               : args.decode_prompt]
        cache = DynamicCache()
        out = model(input_ids=start_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1)
        synchronize([args.device])
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].argmax(-1)
        synchronize([args.device])
        return time.perf_counter() - start

    decode()
    t_decode = statistics.median(decode() for _ in range(args.repeats))
    return {"params": params, "prefill_tokens_per_s": args.prefill_batch * args.prefill_len / t_prefill,
            "prefill_step_ms": t_prefill * 1e3,
            "decode_tokens_per_s": args.decode_batch * args.decode_steps / t_decode,
            "decode_step_ms": t_decode / args.decode_steps * 1e3}


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    g, w = torch.stack(got), torch.stack(want)
    return float((g - w).norm() / w.norm())


class Report:
    """The JSON report, rewritten after every row."""

    def __init__(self, path: str | None, **head):
        self.path = path
        self.data = {**head, "rows": {}}
        self.logits: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, row: dict) -> None:
        if "logits" in row:
            self.logits[name] = row.pop("logits")
        self.data["rows"][name] = row
        self.save()

    def compare_logits(self, reference: str) -> None:
        for name, logits in self.logits.items():
            if name != reference:
                self.data["rows"][name]["logits_rel_error_vs_one_process"] = relative_error(
                    logits, self.logits[reference])
        self.save()

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=2))


def grpc_row(args, spec, ckpt_dir: Path, owned: list[dict], devices: list[str], row: int, loop: LoopThread,
             counter_loads: dict | None, shared_memory: bool, bf16_sums: bool = False, overlap: bool = False,
             same_host_calls: bool = True, host_routed: bool = False, waited: bool = False) -> dict:
    """Start the servers, a gateway in this process, measure, stop; fills counter_loads if given."""
    start = time.perf_counter()
    procs, addresses, placement = start_servers(ckpt_dir, owned, devices, row, spec, Path(args.workdir))
    started = time.perf_counter() - start
    try:
        config = GatewayConfig(checkpoint=str(ckpt_dir), servers=addresses, placement=str(placement),
                               host="127.0.0.1", port=0, dense_dtype="bfloat16", dense_device=devices[0],
                               wire_dtype="bfloat16", connect_timeout=900, rpc_timeout=300,
                               shared_memory=shared_memory, same_host_calls=same_host_calls,
                               pipelined_calls=not waited,
                               # `o` rows: the gateway's Generate streams overlapped too; else the gateway chooses
                               batching=BatchingConfig(decode_graphs=args.decode_graphs,
                                                       overlap=True if overlap else None))
        handle, servicer = loop.run(create_gateway(config))
        try:
            experts = servicer.engine.experts
            if host_routed:  # the routing brought to the host at every MoE layer, as before device-routed calls
                experts.inner.device_routing = False
            if bf16_sums:
                experts.inner.shared_out_dtype = wire.BFLOAT16
            members = experts.inner.pool.members
            kinds = set().union(*(r.shared_kinds for r in members)) if shared_memory else set()
            row = {"shared_kinds": kind_names(kinds),
                   "same_host_channel": all(r.side_link() is not None for r in members) and same_host_calls}
            if counter_loads is not None:
                experts = LoadCounter(experts, spec.num_experts)
                experts.counting = True
                with torch.inference_mode():
                    prompts = prefill_prompts(spec, args)
                    model = servicer.engine.model
                    model.forward(prompts, model.new_caches([args.prefill_len] * len(prompts)), experts)
                experts.counting = False
                counter_loads.update(experts.loads)
            # As the gateway serves a step: two micro-batches, each one's expert calls out while the other
            # computes (PingPong over the dispatcher, which starts calls without waiting).
            pingpong = PingPong(servicer.engine.experts.inner, overlap=True, min_split_tokens=0) if overlap else None
            try:
                row.update(ours_prefill_decode(servicer.engine.model, experts, args, pingpong))
                pending = servicer.engine.experts.inner.pending
                row["unwaited_rounds"] = pending.rounds if pending is not None else 0
            finally:
                if pingpong is not None:
                    pingpong.close()
            row["expert_call_ms_64_tokens"] = expert_call_ms(servicer.engine.experts.inner, spec, devices[0])
            address = f"127.0.0.1:{handle.port}"
            row["generate_streams"] = [generate_streams(address, spec.vocab_size, n, args.decode_prompt,
                                                        args.decode_steps) for n in args.streams]
        finally:
            loop.run(handle.stop(0))
    finally:
        stop_all(procs, 60)
    row["servers_start_s"] = started
    row["experts_per_server"] = [sum(len(v) for v in o.values()) for o in owned]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="reuse this directory instead of writing a new one")
    p.add_argument("--servers", default="2", help="expert server counts to run, e.g. 2 or 1,2,4,4r "
                   "(r: hottest experts replicated, o: overlapped micro-batches, h: host-routed calls, ...)")
    p.add_argument("--replicate", type=int, default=8, help="hottest experts per layer replicated in 'r' rows")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run with --tiny")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-batches", default="", help="also decode at these batch sizes, e.g. 1,8,64,256")
    p.add_argument("--streams", default="", help="served rows: also N concurrent Generate streams through the "
                   "gateway's gRPC API, e.g. 1,8,64 (tokens/s, inter-token latency)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over one decode step of each row")
    p.add_argument("--decode-graphs", action="store_true", help="every row also decodes through "
                   "core.decode_step (dense stages as CUDA graphs between expert calls), and the served "
                   "rows' gateway runs with --decode-graphs (the Generate streams); the profile covers that way")
    p.add_argument("--mps", action="store_true", help="run every process of the benchmark as a client of an MPS "
                   "daemon of its own (benchmarks/mps.py): one GPU context instead of time-sliced ones")
    p.add_argument("--mps-client", action="store_true", help=argparse.SUPPRESS)  # --mps's own run, under the daemon
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-one-process", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-256 model: a quick check of the script")
    p.add_argument("--workdir", default=None, help="checkpoint, placement files and server logs (default: a temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    args.streams = [int(n) for n in args.streams.split(",") if n]
    if args.mps:
        rerun_under_mps("benchmarks.gpu_model", args.out)
    run_rows(args)


def run_rows(args) -> Report:
    """Every row of the run, its JSON and its table."""
    config = dict(DEEPSEEK_MOE_16B)
    if args.tiny:
        config.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                      vocab_size=1000)
    spec = spec_from_config(config)
    on_gpu = args.device.startswith("cuda")
    # As the gateway and expert servers set theirs: few host threads when the tensors live on GPUs.
    threads = set_torch_threads(0, [torch.device(args.device)])
    gpus = torch.cuda.device_count() if on_gpu else 0
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    devices = [f"cuda:{i}" for i in range(gpus)] if on_gpu else ["cpu"]
    print(f"devices: {gpus} x {names[0]}" if gpus else "devices: cpu", flush=True)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-model-", dir=os.environ.get("TMPDIR", "/tmp"))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(args.checkpoint or Path(args.workdir) / "checkpoint")
    if args.checkpoint is None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_checkpoint(ckpt_dir, config, seed=0, device=devices[0])
        print(f"wrote random checkpoint ({spec.model_type}, {spec.num_layers} layers) in "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    args.bandwidth = copy_bandwidth(devices[0]) if on_gpu else 0.0
    report = Report(args.out, gpus=names, torch=torch.__version__, torch_threads=threads, args=vars(args),
                    copy_bandwidth_gb_s=args.bandwidth / 1e9,
                    decode_step_bytes={b: decode_step_bytes(spec, b, args.decode_prompt + args.decode_steps // 2)
                                       for b in sorted({args.decode_batch, *args.decode_batches})})
    if args.bandwidth:
        print(f"device copy bandwidth {args.bandwidth / 1e9:.0f} GB/s", flush=True)
    if args.mps_client:  # this process has started CUDA: an MPS server must now be running for it
        report.data["mps"] = client_state()
    if not args.skip_one_process:
        checkpoint = Checkpoint(ckpt_dir)
        model = load_dense_model(checkpoint, torch.bfloat16, devices[0])
        bank = ExpertBank.load(checkpoint, resolve_ownership(checkpoint.spec, "all"), [torch.device(devices[0])],
                               torch.bfloat16)
        one = ours_prefill_decode(model, InProcessExperts(bank), args)
        one["expert_call_ms_64_tokens"] = expert_call_ms(InProcessExperts(bank), spec, devices[0])
        report.add("one_process_1_device", one)
        row = report.data["rows"]["one_process_1_device"]
        print(f"one process, one device: prefill {row['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {row['decode_tokens_per_s']:.0f} tok/s", flush=True)
        del model, bank
        if on_gpu:
            torch.cuda.empty_cache()
    loop = LoopThread("gpu-model-loop", timeout=900)
    loads: dict[int, torch.Tensor] = {}
    for n, item in enumerate(args.servers.split(",")):
        count, replicated, tcp, bf16, overlap, grpc_calls, host_routed, waited = (
            int(item.rstrip("rtboghw")), "r" in item, "t" in item, "b" in item, "o" in item, "g" in item, "h" in item,
            "w" in item)
        if replicated and not loads:
            raise SystemExit(f"--servers {args.servers}: a replicated row ({item}) needs a plain row before it, "
                             "which counts the experts' loads")
        owned = (replicated_ownership(spec, count, loads, args.replicate) if replicated
                 else balanced_assignment(spec, count))
        name = (f"grpc_{count}_servers" + ("_replicated" if replicated else "") + ("_tcp_bytes" if tcp else "")
                + ("_bf16_sums" if bf16 else "") + ("_overlap" if overlap else "")
                + ("_grpc_calls" if grpc_calls else "") + ("_host_routed" if host_routed else "")
                + ("_waited" if waited else ""))
        if name in report.data["rows"]:
            name += f"_again_{n}"
        try:
            row = grpc_row(args, spec, ckpt_dir, owned, devices, n, loop, None if loads else loads,
                           shared_memory=not tcp, bf16_sums=bf16, overlap=overlap, same_host_calls=not grpc_calls,
                           host_routed=host_routed, waited=waited)
        except Exception as err:  # recorded; the other rows still run
            report.data.setdefault("failed", {})[name] = repr(err)
            report.save()
            print(f"{name}: FAILED {err!r}", flush=True)
            continue
        row["load_imbalance"] = imbalance(owned, loads)
        report.add(name, row)
        print(f"{name} on {min(count, len(devices))} device(s), shared {row['shared_kinds'] or 'none'}: prefill "
              f"{row['prefill_tokens_per_s']:.0f} tok/s, decode {row['decode_tokens_per_s']:.0f} tok/s, busiest "
              f"server / mean {row['load_imbalance']:.3f}, servers started in {row['servers_start_s']:.0f}s",
              flush=True)
    if "one_process_1_device" in report.logits:
        report.compare_logits("one_process_1_device")
    if not args.skip_transformers:
        report.add("transformers_qwen15_moe_a27b_1_device", transformers_qwen(args, devices[0]))
    rows = report.data["rows"]
    base = rows.get("one_process_1_device")
    print(f"\n{'run':<40} {'prefill tok/s':>14} {'x 1-proc':>9} {'decode tok/s':>13} {'x 1-proc':>9} "
          f"{'step ms':>8} {'staged tok/s':>13} {'x 1-proc':>9} {'rel err':>8}")
    for name, row in rows.items():
        pre = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"] if base else float("nan")
        dec = row["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else float("nan")
        staged = row.get("decode_staged_tokens_per_s", float("nan"))
        staged_x = staged / base.get("decode_staged_tokens_per_s", float("nan")) if base else float("nan")
        print(f"{name:<40} {row['prefill_tokens_per_s']:>14.0f} {pre:>9.2f} {row['decode_tokens_per_s']:>13.0f} "
              f"{dec:>9.2f} {row['decode_step_ms']:>8.1f} {staged:>13.0f} {staged_x:>9.2f} "
              f"{row.get('logits_rel_error_vs_one_process', 0):>8.1e}")
    return report


if __name__ == "__main__":
    main()
