"""Expert-server compute for one DeepSeek-MoE-16B MoE layer, against the card's measured bf16 GEMM peak.

64 experts of width 1408, hidden 2048, top-6, random bf16 weights, random routing; every expert on
this server. Two timings per batch size: `compute` with the hidden states already on the GPU (the
grouped GEMMs and gathers alone) and `from host` with them arriving as a CPU tensor, as RunExperts
receives them. Prints a table and writes JSON.

    python -m benchmarks.gpu_experts --devices cuda:0 --out results.json
    python -m benchmarks.gpu_experts --devices cpu --quick          # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from functools import partial

import torch

from benchmarks.timing import synced_times
from moe_serve.core.experts import ExpertWeights
from moe_serve.core.routing import route
from moe_serve.expert_server.bank import ExpertBank, assign_devices
from moe_serve.process.threads import set_torch_threads

HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 1408, 64, 6


def timed(fn, devices, repeats: int) -> list[float]:
    """Seconds per call, each call synchronised, after 3 warm-up calls."""
    return synced_times(fn, devices, repeats, warmup=3)


def gemm_peak(device: torch.device, n: int, repeats: int) -> float:
    """Measured bf16 TFLOP/s of one n x n x n matmul on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = statistics.median(timed(lambda: a @ b, [device], repeats))
    return 2 * n**3 / t / 1e12


def build_bank(devices: list[torch.device], hidden: int, width: int, experts: int,
               cuda_graph_tokens: int = 16384) -> ExpertBank:
    device_of = assign_devices(list(range(experts)), devices)
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for e in range(experts):
        w = ExpertWeights(torch.randn(width, hidden, generator=gen) / hidden**0.5,
                          torch.randn(width, hidden, generator=gen) / hidden**0.5,
                          torch.randn(hidden, width, generator=gen) / width**0.5)
        weights[0, e] = w.to(device_of[e], torch.bfloat16)
    return ExpertBank(weights, experts, hidden, torch.bfloat16, cuda_graph_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cuda:0", help="devices of the experts, e.g. cuda:0 or cuda:0,cuda:1")
    p.add_argument("--tokens", default="1,16,128,512,1024,2048,4096,8192,16384")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a run without a GPU")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch host threads; 0 = as the expert server sets them for these devices")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    devices = [torch.device(d) for d in args.devices.split(",")]
    threads = set_torch_threads(args.torch_threads, devices)
    print(f"torch host threads: {threads}", flush=True)
    hidden, width, experts = (HIDDEN, WIDTH, EXPERTS) if not args.quick else (256, 128, 16)
    tokens_list = [int(t) for t in args.tokens.split(",")] if not args.quick else [1, 64, 512]
    primary = devices[0]
    peak = gemm_peak(primary, 8192 if primary.type == "cuda" else 1024, args.repeats)
    bank = build_bank(devices, hidden, width, experts)
    eager = build_bank(devices, hidden, width, experts, cuda_graph_tokens=0)
    gen = torch.Generator().manual_seed(1)
    rows = []
    print(f"{'tokens':>7} {'eager ms':>9} {'compute ms':>11} {'TFLOP/s':>8} {'% peak':>7} {'from host ms':>13} "
          f"{'TFLOP/s':>8}")
    for tokens in tokens_list:
        host_hidden = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
        weights_k, ids = route(torch.randn(tokens, experts, generator=gen), TOP_K, renormalize=False)
        on_dev = host_hidden.to(primary)
        flops = tokens * TOP_K * 6 * hidden * width  # gate+up (2*H*2I) and down (2*I*H) per routed pair
        # compute: inputs already on the GPU, partial sums left there (grouped GEMMs, gathers, routing prep),
        # eager (one launch per kernel) and with CUDA graphs; from host: what RunExperts does, CPU bf16 in,
        # CPU bf16 out through pinned buffers.
        t_eager = statistics.median(timed(partial(eager.launch, 0, on_dev, ids, weights_k), devices, args.repeats))
        t_dev = statistics.median(timed(partial(bank.launch, 0, on_dev, ids, weights_k), devices, args.repeats))
        t_host = statistics.median(timed(partial(bank.compute, 0, host_hidden, ids, weights_k, torch.bfloat16),
                                         devices, args.repeats))
        row = {"tokens": tokens, "eager_ms": t_eager * 1e3, "compute_ms": t_dev * 1e3,
               "compute_tflops": flops / t_dev / 1e12, "pct_of_peak": 100 * flops / t_dev / 1e12 / peak,
               "from_host_ms": t_host * 1e3,
               "from_host_tflops": flops / t_host / 1e12}
        rows.append(row)
        print(f"{tokens:>7} {row['eager_ms']:>9.3f} {row['compute_ms']:>11.3f} {row['compute_tflops']:>8.1f} "
              f"{row['pct_of_peak']:>6.1f}% {row['from_host_ms']:>13.3f} {row['from_host_tflops']:>8.1f}")
    names = [torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or "cpu" for d in devices]
    result = {"devices": [str(d) for d in devices], "device_names": names, "gemm_peak_tflops": peak,
              "shape": {"hidden": hidden, "width": width, "experts": experts, "top_k": TOP_K},
              "torch": torch.__version__, "torch_threads": threads, "rows": rows}
    print(f"bf16 GEMM peak measured on {names[0]}: {peak:.1f} TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
