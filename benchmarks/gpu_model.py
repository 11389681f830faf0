"""DeepSeek-MoE-16B at full shape on GPUs: gateway + expert servers over gRPC vs one process vs transformers.

Writes a random bf16 checkpoint with DeepSeek-MoE-16B's config (28 layers, hidden 2048, 64 routed
experts of width 1408, top-6, 2 shared experts, vocab 102400; ~16.4 B parameters, ~33 GB), then:
  1. expert servers as real `moe_serve.expert_server.main` processes, one per GPU (and 1 / 4 servers
     for the scaling rows), the gateway's dense layers on cuda:0 in this process, wire dtype bf16;
  2. the same model in one process on one GPU (dense layers + all 64 experts on cuda:0, no gRPC);
  3. transformers' Qwen2-MoE at Qwen1.5-MoE-A2.7B's shape on one GPU, random weights.
For each: prefill tokens/s (8 prompts x 512 tokens in one step) and decode tokens/s (64 sequences,
one token each per step, greedy on the GPU), medians over repeats; distributed logits checked against
the one-process run. Prints a table; writes JSON.

    python benchmarks/gpu_model.py --out results.json          # on a 2-GPU host
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from moe_client.client import ExpertClient
from moe_serve.arch import spec_from_config
from moe_serve.checkpoint import Checkpoint
from moe_serve.core.causal_lm import CausalLM
from moe_serve.expert_server.bank import ExpertBank, InProcessExperts
from moe_serve.gateway.main import GatewayConfig, create_gateway
from moe_serve.layout import dense_tensor_shapes
from moe_serve.models import load_dense_model
from moe_serve.placement import format_ranges, resolve_ownership

DEEPSEEK_MOE_16B = {
    "model_type": "deepseek", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "vocab_size": 102400, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False,
}
QWEN15_MOE_A27B = {
    "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936, "max_position_embeddings": 8192,
    "rope_theta": 1000000.0, "norm_topk_prob": False, "decoder_sparse_step": 1,
}


def write_checkpoint(path: Path, config: dict, seed: int) -> None:
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
            t = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) * scale).cpu()
        shards.setdefault(shard, {})[name] = t
    weight_map = {}
    for shard, tensors in shards.items():
        fname = f"model-{shard}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 900):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def start_servers(checkpoint: Path, count: int, gpus: int, base_port: int) -> tuple[list, list[str]]:
    """`count` expert server processes, experts split evenly, server i on GPU i % gpus."""
    procs, addresses = [], []
    per = 64 // count
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i in range(count):
        port = base_port + i
        experts = format_ranges(list(range(i * per, (i + 1) * per)))
        log = open(f"/tmp/expert-{count}-{i}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "moe_serve.expert_server.main", "--checkpoint", str(checkpoint), "--experts",
             experts, "--devices", f"cuda:{i % gpus}", "--dtype", "bfloat16", "--host", "127.0.0.1", "--port",
             str(port), "--name", f"gpu{i % gpus}-{i}"], stdout=log, stderr=subprocess.STDOUT, env=env), log))
        addresses.append(f"127.0.0.1:{port}")
    for address in addresses:
        with ExpertClient(address) as client:
            client.wait_until_serving(600)
    return procs, addresses


def stop_servers(procs) -> None:
    for proc, _ in procs:
        proc.terminate()
    for proc, log in procs:
        proc.wait(60)
        log.close()


def timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_prefill_decode(model: CausalLM, experts, args) -> dict:
    """Prefill and decode tokens/s of the moe-serve model code over `experts`, greedy on the GPU."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.spec.vocab_size, (args.prefill_len,), generator=gen)
               for _ in range(args.prefill_batch)]

    @torch.inference_mode()
    def prefill():
        caches = [model.new_cache(args.prefill_len) for _ in prompts]
        return model.forward(prompts, caches, experts, last_only=True)

    t_prefill = timed(prefill, args.repeats)

    @torch.inference_mode()
    def decode():
        caches = [model.new_cache(args.decode_prompt + args.decode_steps) for _ in range(args.decode_batch)]
        starts = [p[: args.decode_prompt] for p in (prompts * args.decode_batch)[: args.decode_batch]]
        lengths = [args.decode_prompt] * args.decode_batch
        h = model.forward_hidden(model.embed(torch.cat(starts)), caches, lengths, experts)
        tokens = F.linear(h.view(args.decode_batch, args.decode_prompt, -1)[:, -1], model.lm_head).argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            h = model.forward_hidden(model.embed(tokens), caches, [1] * args.decode_batch, experts)
            tokens = F.linear(h, model.lm_head).argmax(-1)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    decode()  # warm-up: CUDA graphs of every (layer, bucket) get captured
    t_decode = statistics.median(decode() for _ in range(args.repeats))
    return {"prefill_tokens_per_s": args.prefill_batch * args.prefill_len / t_prefill,
            "prefill_step_ms": t_prefill * 1e3,
            "decode_tokens_per_s": args.decode_batch * args.decode_steps / t_decode,
            "decode_step_ms": t_decode / args.decode_steps * 1e3,
            "logits": [t.float() for t in prefill()]}


def transformers_qwen(args) -> dict:
    """Qwen2-MoE at Qwen1.5-MoE-A2.7B's shape in transformers on cuda:0, same measurements."""
    from transformers import DynamicCache, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda:0"):
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**QWEN15_MOE_A27B)).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 151936, (args.prefill_batch, args.prefill_len), device="cuda:0")

    @torch.inference_mode()
    def prefill():
        return model(input_ids=ids, logits_to_keep=1).logits

    t_prefill = timed(prefill, args.repeats)

    @torch.inference_mode()
    def decode():
        start_ids = ids.repeat(args.decode_batch // args.prefill_batch + 1, 1)[: args.decode_batch,
                                                                               : args.decode_prompt]
        cache = DynamicCache()
        out = model(input_ids=start_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="reuse this directory instead of writing a new one")
    p.add_argument("--servers", default="2", help="expert server counts to run, e.g. 2 or 1,2,4")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-256 model: a quick check of the script")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = dict(DEEPSEEK_MOE_16B)
    if args.tiny:
        config.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                      vocab_size=1000)
    gpus = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    print(f"GPUs: {gpus} x {names[0] if names else '-'}", flush=True)
    tmp = None
    if args.checkpoint is None:
        tmp = tempfile.mkdtemp(prefix="deepseek16b-", dir=os.environ.get("TMPDIR", "/tmp"))
        start = time.perf_counter()
        write_checkpoint(Path(tmp), config, seed=0)
        print(f"wrote random DeepSeek-MoE-16B checkpoint in {time.perf_counter() - start:.0f}s", flush=True)
    ckpt_dir = Path(args.checkpoint or tmp)
    results: dict = {"gpus": names, "torch": torch.__version__, "args": vars(args), "rows": {}}
    loop = LoopThread()
    reference_logits = None
    for count in [int(c) for c in args.servers.split(",")]:
        procs, addresses = start_servers(ckpt_dir, count, gpus, 51000 + 10 * count)
        try:
            config = GatewayConfig(checkpoint=str(ckpt_dir), servers=addresses, host="127.0.0.1", port=0,
                                   dense_dtype="bfloat16", dense_device="cuda:0", wire_dtype="bfloat16",
                                   connect_timeout=600, rpc_timeout=120)
            handle, servicer = loop.run(create_gateway(config))
            row = ours_prefill_decode(servicer.engine.model, servicer.engine.experts, args)
            loop.run(handle.stop(0))
        finally:
            stop_servers(procs)
        results["rows"][f"grpc_{count}_servers"] = row
        print(f"gRPC, {count} expert server(s) on {min(count, gpus)} GPU(s): prefill "
              f"{row['prefill_tokens_per_s']:.0f} tok/s, decode {row['decode_tokens_per_s']:.0f} tok/s", flush=True)
    checkpoint = Checkpoint(ckpt_dir)
    model = load_dense_model(checkpoint, torch.bfloat16, "cuda:0")
    bank = ExpertBank.load(checkpoint, resolve_ownership(checkpoint.spec, "all"), [torch.device("cuda:0")],
                           torch.bfloat16)
    base = ours_prefill_decode(model, InProcessExperts(bank), args)
    reference_logits = base.pop("logits")
    results["rows"]["one_process_1_gpu"] = base
    print(f"one process, one GPU: prefill {base['prefill_tokens_per_s']:.0f} tok/s, "
          f"decode {base['decode_tokens_per_s']:.0f} tok/s", flush=True)
    del model, bank
    torch.cuda.empty_cache()
    for row in results["rows"].values():
        if "logits" in row:
            row["logits_rel_error_vs_one_process"] = relative_error(row.pop("logits"), reference_logits)
    if not args.skip_transformers:
        results["rows"]["transformers_qwen15_moe_a27b_1_gpu"] = transformers_qwen(args)
        torch.cuda.empty_cache()
    print(f"\n{'run':<40} {'prefill tok/s':>14} {'x 1-proc':>9} {'decode tok/s':>13} {'x 1-proc':>9} "
          f"{'step ms':>8} {'rel err':>8}")
    for name, row in results["rows"].items():
        print(f"{name:<40} {row['prefill_tokens_per_s']:>14.0f} "
              f"{row['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>9.2f} "
              f"{row['decode_tokens_per_s']:>13.0f} {row['decode_tokens_per_s'] / base['decode_tokens_per_s']:>9.2f} "
              f"{row['decode_step_ms']:>8.1f} {row.get('logits_rel_error_vs_one_process', 0):>8.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
