"""Wire dtypes per direction, on whole models: the error each choice puts into the logits, and its bytes.

    python -m benchmarks.wire_error [--seeds 3] [--out bench-results/wire-error.json]

Every causal architecture moe-serve serves (tiny random checkpoints of mixtral, qwen2_moe, qwen3_moe,
olmoe and deepseek from tests.support: transformers' own save_pretrained, DeepSeek's hub names) runs
in this process with every MoE layer's hidden states sent to the experts in one wire dtype and the
partial sums sent back in another, through the gateway's own codec (moe_serve.rpc.codec: fp8 is
e4m3 with a float32 scale per token). Logits of random prompts are compared with the fp32 wire:
relative RMS error, max abs error over the logits' own scale, and how often the top-1 token changes.
Bytes per token per layer follow from the RunExperts message: hidden H x size (+4 for fp8's scale),
ids and weights K x 8, the reply H x size (+4).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from moe_client import wire
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference
from moe_serve.rpc.codec import from_wire, to_wire
from tests.support import ROOT
from tests.support.checkpoints import write_causal_checkpoints

# (hidden states to the experts, partial sums back)
CHOICES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"),
           ("float8_e4m3", "float32"), ("float8_e4m3", "bfloat16"), ("float8_e4m3", "float8_e4m3")]
SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 1}
MODELS = {"DeepSeek-MoE-16B": (2048, 6), "Mixtral-8x7B": (4096, 2)}  # hidden H, top-k K


class WireRoundTrip:
    """An ExpertBackend that sends hidden states and sums through the codec in the given wire dtypes."""

    def __init__(self, inner, to_experts: str, back: str):
        self.inner = inner
        self.out_dtype, self.back_dtype = wire.dtype_from_name(to_experts), wire.dtype_from_name(back)

    def run(self, layer, hidden, expert_ids, weights):
        sent = from_wire(to_wire(hidden.float(), self.out_dtype), "hidden").float()
        out = self.inner.run(layer, sent, expert_ids, weights)
        return from_wire(to_wire(out.float(), self.back_dtype), "output").float()


def bytes_per_token(hidden: int, top_k: int, to_experts: str, back: str) -> dict:
    """RunExperts bytes per token per layer for one server: request, reply (tensor bytes, scales, ids, weights)."""
    request = hidden * SIZES[to_experts] + (4 if to_experts == "float8_e4m3" else 0) + top_k * 8
    reply = hidden * SIZES[back] + (4 if back == "float8_e4m3" else 0)
    return {"request": request, "reply": reply, "total": request + reply}


def logits_error(path: Path, prompts: list[list[int]], to_experts: str, back: str, reference: list) -> dict:
    """Errors of the logits with this wire choice against `reference` (the fp32 wire's)."""
    model, experts = load_reference(Checkpoint(path))
    backend = WireRoundTrip(experts, to_experts, back)
    with torch.inference_mode():
        got = model.forward([torch.tensor(p) for p in prompts], [model.new_cache(64) for _ in prompts], backend)
    g, r = torch.cat(got), torch.cat(reference)
    return {"rel_rms": float((g - r).norm() / r.norm()), "max_abs_over_max": float((g - r).abs().max() / r.abs().max()),
            "top1_changed": float((g.argmax(-1) != r.argmax(-1)).float().mean()), "positions": len(g)}


def main(argv: list[str] | None = None) -> int:
    """Measure every (architecture, choice) over --seeds checkpoints; print a table; write JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.wire_error", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="random checkpoints per architecture")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "wire-error.json"))
    args = p.parse_args(argv)
    rows: dict[tuple[str, str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="moe-wire-") as tmp:
        for seed in range(args.seeds):
            for arch, path in write_causal_checkpoints(Path(tmp) / str(seed), 1000 * seed + 16).items():
                model, experts = load_reference(Checkpoint(path))
                gen = torch.Generator().manual_seed(seed)
                prompts = [torch.randint(0, model.spec.vocab_size, (n,), generator=gen).tolist() for n in (1, 9, 40)]
                with torch.inference_mode():
                    reference = model.forward([torch.tensor(q) for q in prompts],
                                              [model.new_cache(64) for _ in prompts], experts)
                for choice in CHOICES:
                    rows.setdefault((arch, *choice), []).append(logits_error(path, prompts, *choice, reference))
    result = {"command": "python -m benchmarks.wire_error " + " ".join(argv if argv is not None else sys.argv[1:]),
              "errors": [], "bytes_per_token_per_layer": []}
    for (arch, to_experts, back), runs in rows.items():
        worst = {k: max(r[k] for r in runs) for k in ("rel_rms", "max_abs_over_max", "top1_changed")}
        result["errors"].append({"arch": arch, "to_experts": to_experts, "back": back, "worst_of_seeds": worst,
                                 "seeds": len(runs)})
    for name, (hidden, top_k) in MODELS.items():
        for choice in CHOICES:
            result["bytes_per_token_per_layer"].append({"model": name, "to_experts": choice[0], "back": choice[1],
                                                        **bytes_per_token(hidden, top_k, *choice)})
    print(f"{'arch':>10} {'to experts':>12} {'back':>12} {'rel RMS':>9} {'max/max':>9} {'top-1 changed':>13}")
    for e in result["errors"]:
        w = e["worst_of_seeds"]
        print(f"{e['arch']:>10} {e['to_experts']:>12} {e['back']:>12} {w['rel_rms']:9.2e} {w['max_abs_over_max']:9.2e} "
              f"{w['top1_changed']:13.1%}")
    print(f"\n{'model':>17} {'to experts':>12} {'back':>12} {'request B':>9} {'reply B':>8} {'total B':>8}")
    for b in result["bytes_per_token_per_layer"]:
        print(f"{b['model']:>17} {b['to_experts']:>12} {b['back']:>12} {b['request']:9d} {b['reply']:8d} "
              f"{b['total']:8d}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
