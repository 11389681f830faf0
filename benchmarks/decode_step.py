"""One-process decode at DeepSeek-MoE-16B's shape: the static KV pool and the decode step, eager and as CUDA graphs.

Random bf16 weights made on the device (no checkpoint: 27 MoE layers of 64 experts of width 1408, top-6,
2 shared experts, hidden 2048, vocab 102400; ~16.4 B parameters), every expert in this process
(core.grouped_backend), then per batch size (default 1, 8, 64, 256) decode tokens/s of:
  forward  model.forward_hidden over one shared KV pool: batched cache writes and decode attention, eager;
  eager    core.decode_step.DecodeStep without graphs (its stages on fixed buffers);
  graphs   DecodeStep with a CUDA graph per stage between routed-expert calls, the calls made by the host
           between replays (the served path's cut: there each call is a round trip to the expert servers);
  whole    DecodeStep with the expert calls captured too: the whole step is one graph;
  hf       transformers' Qwen2-MoE at Qwen1.5-MoE-A2.7B's shape (the comparison in issue 14), random weights.
Each step feeds a fixed random token per sequence (the same for every impl) and computes the logits and
their argmax, as sampling would. Also: the bytes a step must read (benchmarks/gpu_measures.py: dense
weights, lm_head, the experts a batch routed uniformly touches, the KV cache) against the
device-to-device copy bandwidth measured in the same run, the logits of each impl against `forward`'s,
torch.profiler's table by op of some impls' steps (--profile), and the eager step's time per stage
(attention, router, shared experts, routed experts, ...) from profiler ranges (--profile-batch, 0 for none).

    python -m benchmarks.decode_step --out decode.json                       # on the lent H200
    python -m benchmarks.decode_step --tiny --device cpu --impls forward,eager --batches 1,8   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_measures import copy_bandwidth, decode_step_bytes, profile_step
from benchmarks.model_shapes import DEEPSEEK_MOE_16B, QWEN15_MOE_A27B
from benchmarks.timing import synchronize
from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.decode_step import DecodeStep
from moe_serve.core.grouped import StackedExperts
from moe_serve.core.grouped_backend import GroupedExperts
from moe_serve.core.step_graphs import GraphRecorder
from moe_serve.model.config import spec_from_config
from moe_serve.model.tensor_shapes import dense_tensor_shapes

TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, vocab_size=1000)


class HostCalls:
    """The same experts, not capturable: the decode step leaves each call to the host, as the served path does."""

    def __init__(self, inner: GroupedExperts):
        self.inner = inner

    def run(self, layer, hidden, expert_ids, weights):
        return self.inner.run(layer, hidden, expert_ids, weights)


def random_model(spec, device: str, dtype: torch.dtype) -> tuple[CausalLM, GroupedExperts]:
    """Dense layers and stacked experts with random weights (std 1/sqrt(fan_in); norms 1), made on `device`."""
    torch.manual_seed(0)
    tensors = {}
    for name, shape in dense_tensor_shapes(spec).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            scale = 0.02 if "embed" in name or "lm_head" in name else shape[-1] ** -0.5
            tensors[name] = torch.randn(shape, device=device, dtype=dtype) * scale
    model = CausalLM.from_tensors(spec, tensors, dtype, device)
    e, h, i = spec.num_experts, spec.hidden_size, spec.expert_width
    layers = {layer: StackedExperts(tuple(range(e)), torch.randn(e, 2 * i, h, device=device, dtype=dtype) * h ** -0.5,
                                    torch.randn(e, h, i, device=device, dtype=dtype) * i ** -0.5)
              for layer in spec.moe_layers}
    return model, GroupedExperts(layers, e)


def ours(model: CausalLM, experts: GroupedExperts, impl: str, batch: int, args) -> dict:
    """Decode tokens/s of one impl at one batch size, after a prompt of args.prompt tokens per sequence."""
    device = args.device
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.spec.vocab_size, (batch, args.prompt), generator=gen)
    fed = torch.randint(0, model.spec.vocab_size, (args.warmup + args.steps, batch), generator=gen).to(device)
    pool = model.new_pool(slots=batch, capacity=args.prompt + args.warmup + args.steps + 8)  # no growth while timed
    caches = [pool.allocate() for _ in range(batch)]
    backend = experts if impl == "whole" else HostCalls(experts)
    with torch.inference_mode():
        model.forward(list(prompts), caches, backend, last_only=True)
        # Without a GPU the graph impls run through the CPU stand-in recorder (replays re-run the stages).
        recorder = None if device.startswith("cuda") else GraphRecorder()
        step = None if impl == "forward" else DecodeStep(model, pool, impl in ("graphs", "whole"), recorder)

        def one(tokens):
            if step is None:
                h = model.forward_hidden(model.embed(tokens), caches, [1] * batch, backend)
            else:
                h = step.run(tokens, caches, backend)
            return F.linear(h, model.lm_head).argmax(-1), h

        for t in range(args.warmup):  # the graphs of this batch's bucket and span are captured here
            one(fed[t])
        synchronize([device])
        start = time.perf_counter()
        for t in range(args.warmup, args.warmup + args.steps):
            _, h = one(fed[t])
        synchronize([device])
        seconds = time.perf_counter() - start
        logits = F.linear(h, model.lm_head).float()
        row = {"decode_tokens_per_s": batch * args.steps / seconds, "step_ms": seconds / args.steps * 1e3,
               "captures": step.graphs.captures if step is not None and step.graphs is not None else 0,
               "capture_failures": step.graphs.failures if step is not None and step.graphs is not None else []}
        if impl in args.profile.split(",") and batch == args.profile_batch:
            row["profile"] = profile_step(lambda: one(fed[-1]), device)
            top = row["profile"]["top_device" if device.startswith("cuda") else "top_cpu"][:12]
            print(f"{impl} at batch {batch}, one step: wall {row['profile']['wall_ms']:.2f} ms; top ops: "
                  + ", ".join(f"{r['op']} {r['self_device_ms'] or r['self_cpu_ms']:.2f}" for r in top), flush=True)
    return row, logits


STAGES = {"attention_residual": "attention (input norm, qkv, rope, cache write, attend, o)",
          "route_tokens": "router (logits, softmax, top-k)", "shared_experts": "shared experts",
          "add_experts": "residual add of experts", "swiglu": "dense MLP (first layer)",
          "rms_norm": "post-attention and final norms"}


def stage_breakdown(model: CausalLM, experts: GroupedExperts, batch: int, args) -> dict[str, dict]:
    """Per stage of the eager decode step: host and device ms per step (torch.profiler ranges)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from moe_serve.core import decode_step

    def labelled(fn, name):
        def wrapper(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return wrapper

    saved = {name: getattr(decode_step, name) for name in STAGES}
    for name, label in STAGES.items():
        setattr(decode_step, name, labelled(saved[name], label))
    routed = HostCalls(experts)
    routed.run = labelled(routed.run, "routed experts (grouped GEMMs)")
    try:
        pool = model.new_pool(slots=batch, capacity=args.prompt + 8)
        caches = [pool.allocate() for _ in range(batch)]
        prompts = torch.randint(0, model.spec.vocab_size, (batch, args.prompt))
        fed = torch.randint(0, model.spec.vocab_size, (4, batch), device=args.device)
        with torch.inference_mode():
            model.forward(list(prompts), caches, routed, last_only=True)
            step = DecodeStep(model, pool, graphs=False)
            step.run(fed[0], caches, routed)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
            with torch_profile(activities=activities) as prof:
                for t in range(1, 4):
                    with record_function("whole step"):
                        step.run(fed[t], caches, routed)
                synchronize([args.device])
    finally:
        for name, fn in saved.items():
            setattr(decode_step, name, fn)
    labels = {*STAGES.values(), "routed experts (grouped GEMMs)", "whole step"}
    out = {}
    for e in prof.key_averages():
        if e.key in labels:
            device_us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
            out[e.key] = {"host_ms_per_step": e.cpu_time_total / 3e3, "device_ms_per_step": device_us / 3e3,
                          "calls_per_step": e.count / 3}
    print(f"\nstages of the eager decode step at batch {batch} (torch.profiler, mean of 3 steps):")
    for key, row in sorted(out.items(), key=lambda kv: -kv[1]["host_ms_per_step"]):
        print(f"  {key:<60} host {row['host_ms_per_step']:8.2f} ms  device {row['device_ms_per_step']:8.2f} ms  "
              f"x{row['calls_per_step']:.0f}", flush=True)
    return out


def transformers_decode(batch: int, args) -> dict:
    """transformers' Qwen2-MoE (A2.7B shape) decode tokens/s at `batch`, the same prompt and step counts."""
    from transformers import DynamicCache, Qwen2MoeConfig, Qwen2MoeForCausalLM

    shape = dict(QWEN15_MOE_A27B)
    if args.tiny:
        shape.update(TINY, shared_expert_intermediate_size=512)
    if not hasattr(transformers_decode, "model"):
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(args.device):
            transformers_decode.model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**shape)).eval()
        torch.set_default_dtype(torch.float32)
    model = transformers_decode.model
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), device=args.device)
    with torch.inference_mode():
        cache = DynamicCache()
        tokens = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        for _ in range(args.warmup):
            tokens = model(input_ids=tokens[:, None], past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        synchronize([args.device])
        start = time.perf_counter()
        for _ in range(args.steps):
            tokens = model(input_ids=tokens[:, None], past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        synchronize([args.device])
        seconds = time.perf_counter() - start
    return {"decode_tokens_per_s": batch * args.steps / seconds, "step_ms": seconds / args.steps * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--impls", default="forward,eager,graphs,whole,hf")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence before decoding")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (graphs captured here)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--profile", default="eager,graphs", help="impls whose steps torch.profiler tabulates by op")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-256 model: a quick check of the script")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = dict(DEEPSEEK_MOE_16B, **(TINY if args.tiny else {}))
    spec = spec_from_config(config)
    dtype = torch.bfloat16
    on_gpu = args.device.startswith("cuda")
    head = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__,
            "args": vars(args), "copy_bandwidth_bytes_per_s": copy_bandwidth(args.device) if on_gpu else float("nan")}
    print(json.dumps(head), flush=True)
    impls = args.impls.split(",")
    model, experts = random_model(spec, args.device, dtype)
    print(f"whole-step graphs possible: {experts.capturable}", flush=True)
    rows: dict[str, dict] = {}
    for batch in map(int, args.batches.split(",")):
        logits = {}
        for impl in impls:
            if impl == "hf":
                continue
            if impl == "whole" and not experts.capturable:
                continue
            try:
                row, logits[impl] = ours(model, experts, impl, batch, args)
            except Exception as err:  # recorded; the other rows still run
                rows[f"{impl}_b{batch}"] = {"failed": repr(err)}
                print(f"b={batch:<4} {impl:<8} FAILED {err!r}", flush=True)
                continue
            row["step_bytes"] = decode_step_bytes(spec, batch, args.prompt + args.warmup + args.steps // 2)["total"]
            row["share_of_bandwidth_bound"] = (row["step_bytes"] / head["copy_bandwidth_bytes_per_s"]
                                               / (row["step_ms"] / 1e3))
            if impl != "forward" and "forward" in logits:
                ref = logits["forward"]
                row["logits_rel_error_vs_forward"] = float((logits[impl] - ref).norm() / ref.norm())
            rows[f"{impl}_b{batch}"] = row
            print(f"b={batch:<4} {impl:<8} {row['decode_tokens_per_s']:>9.0f} tok/s {row['step_ms']:>8.2f} ms/step "
                  f"{row['share_of_bandwidth_bound']:>6.1%} of bound  rel err "
                  f"{row.get('logits_rel_error_vs_forward', 0):.1e}", flush=True)
        if "hf" in impls:
            row = transformers_decode(batch, args)
            rows[f"hf_b{batch}"] = row
            print(f"b={batch:<4} {'hf':<8} {row['decode_tokens_per_s']:>9.0f} tok/s {row['step_ms']:>8.2f} ms/step",
                  flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=2))
    if args.profile_batch:
        head["stages"] = stage_breakdown(model, experts, args.profile_batch, args)
    if args.out:
        Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
