"""`moe-serve inspect`: what a checkpoint holds, what each part weighs, and how to split its experts."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_client.ownership import Ownership, format_ownership, format_ranges
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.placement import balanced_assignment, placement_entries, write_placement
from moe_serve.model.tensor_shapes import expert_tensor_shapes


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def expert_bytes(checkpoint: Checkpoint, layer: int, expert: int) -> int:
    """Bytes of one routed expert's three tensors, from the file headers."""
    return sum(checkpoint.nbytes(name) for name in expert_tensor_shapes(checkpoint.spec, layer, expert))


def dense_bytes(checkpoint: Checkpoint) -> tuple[int, int]:
    """(bytes, tensor count) of everything but the routed experts: what the gateway loads."""
    names = [n for n in checkpoint.names if not checkpoint.spec.is_expert_tensor(n)]
    return sum(checkpoint.nbytes(n) for n in names), len(names)


def describe(checkpoint: Checkpoint) -> list[str]:
    """Architecture, layers, experts and sizes, one line each."""
    spec = checkpoint.spec
    moe = list(spec.moe_layers)
    dense = [layer for layer in range(spec.num_layers) if not spec.is_moe_layer(layer)]
    one = expert_bytes(checkpoint, moe[0], 0)
    all_experts = sum(expert_bytes(checkpoint, layer, e) for layer in moe for e in range(spec.num_experts))
    dense_total, dense_count = dense_bytes(checkpoint)
    lines = [
        f"Checkpoint: {checkpoint.path} (model_type {spec.model_type}, stored as {spec.torch_dtype})",
        f"  hidden {spec.hidden_size}, {spec.num_layers} layers: MoE layers {format_ranges(moe)} ({len(moe)}), "
        f"dense MLP layers {format_ranges(dense) if dense else 'none'}",
        f"  {spec.num_experts} routed experts per MoE layer, width {spec.expert_width}, top-{spec.top_k}, "
        f"renormalised top-k: {'yes' if spec.norm_topk_prob else 'no'}"
        + (f"; shared experts width {spec.shared_expert_width}"
           + (" (sigmoid-gated)" if spec.shared_expert_gated else "") if spec.shared_expert_width else ""),
    ]
    if spec.has_attention:
        tokenizer = "yes" if (checkpoint.path / "tokenizer.json").is_file() else "no"
        lines.append(f"  attention: {spec.num_heads} heads / {spec.num_kv_heads} KV heads of {spec.head_dim}; "
                     f"vocab {spec.vocab_size}; context {spec.max_position_embeddings}; tokenizer.json: {tokenizer}")
    lines += [
        f"  bytes per expert: {_size(one)} ({one} B, {checkpoint.dtype(spec.expert_names(moe[0], 0)[0])})",
        f"  all routed experts: {len(moe)} x {spec.num_experts} = {len(moe) * spec.num_experts} experts, "
        f"{_size(all_experts)}",
        f"  dense part (gateway): {_size(dense_total)} in {dense_count} tensors",
        f"  total: {_size(all_experts + dense_total)}",
    ]
    return lines


def describe_assignment(checkpoint: Checkpoint, owned: list[Ownership]) -> list[str]:
    """One line per server: its experts and their bytes."""
    lines = [f"Balanced assignment to {len(owned)} expert server(s):"]
    for i, mine in enumerate(owned):
        count = sum(len(ids) for ids in mine.values())
        size = sum(expert_bytes(checkpoint, layer, e) for layer, ids in mine.items() for e in ids)
        ranges = format_ownership(mine)
        shown = "; ".join(ranges) if len(ranges) <= 4 else "; ".join(ranges[:3]) + f"; ... ({len(ranges)} layers)"
        lines.append(f"  worker{i + 1}: {count} experts, {_size(size)}: {shown}")
    return lines


def run(args: argparse.Namespace) -> int:
    """The inspect subcommand."""
    checkpoint = Checkpoint(args.checkpoint)
    for line in describe(checkpoint):
        print(line)
    addresses = [a.strip() for a in (args.addresses or "").split(",") if a.strip()]
    servers = args.servers or len(addresses) or 1
    owned = balanced_assignment(checkpoint.spec, servers)
    for line in describe_assignment(checkpoint, owned):
        print(line)
    if args.write_placement:
        if not addresses:
            raise SystemExit("moe-serve inspect: --write-placement needs --addresses host:port,... (one per server)")
        write_placement(Path(args.write_placement), placement_entries(checkpoint.spec, owned, addresses))
        print(f"Placement file written to {args.write_placement}")
    return 0


def add_parser(sub) -> None:
    """Register `inspect` on the moe-serve subparsers."""
    p = sub.add_parser("inspect", help="describe a checkpoint and split its experts over N servers")
    p.add_argument("checkpoint", help="checkpoint directory: config.json + *.safetensors")
    p.add_argument("--servers", type=int, default=None, help="number of expert servers (default: one per address)")
    p.add_argument("--addresses", help="comma-separated host:port of the expert servers, for the placement file")
    p.add_argument("--write-placement", metavar="FILE", help="write the assignment as a placement file (JSON)")
