"""`moe-serve`: project tools that are not services (make the embedded model, check a gateway, inspect)."""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
import torch

from moe_client import wire
from moe_serve.model.checkpoint import CheckpointError
from moe_serve.model.placement import PlacementError
from moe_serve.model.synthetic import SyntheticConfig, write_checkpoint
from moe_serve.model.synthetic_lm import SyntheticLMConfig, write_causal_lm
from moe_serve.tools.inspect_checkpoint import add_parser as add_inspect_parser
from moe_serve.tools.inspect_checkpoint import run as inspect_checkpoint
from moe_serve.tools.placement_cli import add_parsers as add_placement_parsers
from moe_serve.tools.placement_cli import run_plan, run_rebalance
from moe_serve.tools.planner import PlanError
from moe_serve.tools.versions import PrintVersions


def _create_model(args: argparse.Namespace) -> int:
    if args.causal_lm:
        return _create_causal_lm(args)
    cfg = SyntheticConfig(hidden_size=args.hidden, intermediate_size=args.width, num_hidden_layers=args.layers,
                          num_experts=args.experts, num_experts_per_tok=args.top_k, seed=args.seed)
    path = write_checkpoint(args.output, cfg)
    print(f"Wrote {cfg.num_hidden_layers}-layer simple_moe model (hidden {cfg.hidden_size}, {cfg.num_experts} "
          f"experts of width {cfg.intermediate_size}, top-{cfg.num_experts_per_tok}, seed {cfg.seed}) to {path}")
    return 0


def _create_causal_lm(args: argparse.Namespace) -> int:
    d = SyntheticLMConfig()
    cfg = SyntheticLMConfig(hidden_size=args.hidden or d.hidden_size, num_hidden_layers=args.layers,
                            num_experts=args.experts, num_experts_per_tok=args.top_k,
                            moe_intermediate_size=args.width or d.moe_intermediate_size, seed=args.seed)
    path = write_causal_lm(args.output, cfg)
    print(f"Wrote a {cfg.num_hidden_layers}-layer qwen3_moe causal LM (hidden {cfg.hidden_size}, {cfg.num_experts} "
          f"experts of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, context "
          f"{cfg.max_position_embeddings}, seed {cfg.seed}) with tokenizer.json and a chat template to {path}. "
          "Its weights are random: the text it generates is gibberish.")
    return 0


# Relative error ||got - want|| / ||want|| allowed, by the least precise dtype on the served path. Past
# float32 the error is mostly routing: a token whose top-k scores nearly tie picks other experts in a later
# layer once its hidden state is rounded. Measured on the demo model (256 tokens x 5 draws each): bf16 experts
# 2.3%, bf16 wire 1.2%, both 3.3%, fp16 wire 1.7%, fp8 wire 2.1%; fp32 2.6e-7.
TOLERANCES = {"float32": 1e-5, "float16": 5e-2, "bfloat16": 5e-2, "float8_e4m3": 1e-1}
_PRECISION = ["float32", "float16", "bfloat16", "float8_e4m3"]  # most to least precise


def served_dtype(info) -> str:
    """The least precise dtype on a gateway's path: its dense layers, its wire, its expert servers."""
    names = [wire.dtype_name(info.dense_dtype or wire.FLOAT32), wire.dtype_name(info.wire_dtype or wire.FLOAT32)]
    names += [wire.dtype_name(s.compute_dtype) for s in info.servers if s.compute_dtype]
    return max(names, key=lambda n: _PRECISION.index(n) if n in _PRECISION else 0)


def _verify(args: argparse.Namespace) -> int:
    """Send fresh random input through the gateway and compare with the in-process float32 reference."""
    from moe_client.client import GatewayClient
    from moe_serve.model.checkpoint import Checkpoint
    from moe_serve.model.loader import load_reference

    checkpoint = Checkpoint(args.checkpoint)
    hidden = np.random.default_rng(args.seed).standard_normal((args.tokens, checkpoint.spec.hidden_size),
                                                              dtype=np.float32)
    with GatewayClient(args.gateway) as client:
        dtype = served_dtype(client.model_info())
        got = client.forward(hidden)
    model, experts = load_reference(checkpoint)
    with torch.inference_mode():
        if checkpoint.spec.has_attention:  # Forward on a causal LM: one sequence at positions 0..tokens-1
            want = model.forward_hidden(torch.from_numpy(hidden), [model.new_cache(args.tokens)], [args.tokens],
                                        experts).numpy()
        else:
            want = model.forward(torch.from_numpy(hidden), experts).numpy()
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCES.get(dtype, TOLERANCES["float32"])
    relative = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    ok = relative <= tolerance
    print(f"Gateway {args.gateway} (served in {dtype}) vs the in-process float32 reference of {checkpoint.path}, "
          f"{args.tokens} random tokens: relative error {relative:.2e}, max abs error "
          f"{float(np.abs(got - want).max()):.2e} ({'OK' if ok else 'FAIL'}, tolerance {tolerance:.0e} for {dtype})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of moe-serve."""
    parser = argparse.ArgumentParser(prog="moe-serve", description="moe-serve tools.")
    parser.add_argument("--version", action=PrintVersions,
                        help="print the versions of moe-serve and of the runtime it runs on, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-model", help="write the embedded default simple_moe checkpoint, or with "
                                                 "--causal-lm a tiny random causal LM with a tokenizer")
    create.add_argument("output", help="directory to write config.json and model.safetensors into")
    create.add_argument("--causal-lm", action="store_true",
                        help="a tiny random qwen3_moe causal LM with tokenizer.json and a chat template, for "
                             "Generate and the OpenAI API (random weights: its text is gibberish)")
    create.add_argument("--hidden", type=int, default=None, help="hidden size (default 512; 64 with --causal-lm)")
    create.add_argument("--width", type=int, default=None, help="expert width (default 1024; 96 with --causal-lm)")
    create.add_argument("--layers", type=int, default=2, help="MoE layers (default 2)")
    create.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    create.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    create.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    verify = sub.add_parser("verify", help="compare a gateway's Forward with the in-process reference")
    verify.add_argument("--gateway", default="127.0.0.1:50050", help="gateway host:port")
    verify.add_argument("--checkpoint", required=True, help="the checkpoint the cluster serves")
    verify.add_argument("--tokens", type=int, default=64, help="random tokens to send (default 64)")
    verify.add_argument("--seed", type=int, default=None, help="seed of the random input (default: fresh)")
    verify.add_argument("--tolerance", type=float, default=None,
                        help="relative error ||got - want|| / ||want|| allowed (default: by the least precise dtype "
                             "served: " + ", ".join(f"{k} {v:.0e}" for k, v in TOLERANCES.items()) + ")")
    add_inspect_parser(sub)
    add_placement_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "create-model" and not args.causal_lm:
        args.hidden, args.width = args.hidden or 512, args.width or 1024
    if args.command in ("plan", "rebalance"):
        try:
            return (run_plan if args.command == "plan" else run_rebalance)(args)
        except (PlanError, PlacementError, ValueError, OSError) as err:
            print(f"moe-serve {args.command}: error: {err}", file=sys.stderr)
            return 2
        except grpc.RpcError as err:
            print(f"moe-serve {args.command}: error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if args.command == "inspect":
        try:
            return inspect_checkpoint(args)
        except (CheckpointError, PlacementError) as err:
            print(f"moe-serve inspect: error: {err}", file=sys.stderr)
            return 2
    if args.command == "create-model":
        return _create_model(args)
    try:
        return _verify(args)
    except (CheckpointError, OSError) as err:
        print(f"moe-serve verify: error: {err}", file=sys.stderr)
    except grpc.RpcError as err:
        print(f"moe-serve verify: error: gateway {args.gateway}: {err.code().name}: {err.details()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
