"""Predicted prefill and decode tok/s of a served MoE over Ethernet, from measured per-call costs and bytes.

    python -m benchmarks.sizing                                   # the tables of docs/deployment-sizing.md
    python -m benchmarks.sizing --check bench-results/shaped-links.json   # the model against shaped links

The model (docs/deployment-sizing.md says why each term is there): one gateway host and N expert hosts,
experts split evenly, each host behind a link of `rate` with `rtt`. A MoE layer sends each expert host
the rows of the tokens routed to at least one of its experts, all hosts at once, and waits for the
slowest; layers run one after another. So per layer:

    t_layer = rtt + call_overhead + max(max(bytes out, bytes in) / rate, (bytes out + bytes in) / wire_cap)

where bytes out and in are the gateway's (its own link carries every host's rows: its NIC is the
shared bottleneck; the link is full duplex), `wire_cap` is what the TCP path moves per second at best,
request and reply bytes together (measured; lanes included), and `call_overhead` the fixed cost of one
RunExperts round trip (measured). Compute is left out: these are the transport's
limits; the GPU's own limits are in docs/gpu.md.
Legend: T = tokens in a layer call, H = hidden, E = experts, K = top-k, N = expert hosts, L = MoE layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from math import comb

WIRE_BYTES = {"float32": 4, "bfloat16": 2, "float8_e4m3": 1}


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int  # H
    experts: int  # E routed experts per MoE layer
    top_k: int  # K
    moe_layers: int  # L


MODELS = [Model("DeepSeek-MoE-16B", 2048, 64, 6, 27), Model("Mixtral-8x7B", 4096, 8, 2, 32)]


@dataclass(frozen=True)
class Transport:
    """Measured costs of the TCP side channel (defaults: docs/deployment-sizing.md, 'The TCP side channel';
    the gRPC path's were 0.65 ms and 1.2 GB/s on a quiet 16-core host)."""

    call_overhead_s: float = 0.29e-3  # one 4 KiB RunExperts round trip over the side channel, 2-core machine
    wire_cap_bytes_s: float = 2.7e9  # request + reply bytes per second at 8-16 MiB, lanes, 2-core loopback
    to_experts: str = "bfloat16"
    back: str = "bfloat16"


def share_touched(model: Model, hosts: int) -> float:
    """Probability that a token routes to at least one expert of a host owning E/N experts (uniform top-K)."""
    own = model.experts // hosts
    if own == 0:
        return 1.0
    return 1.0 - comb(model.experts - own, model.top_k) / comb(model.experts, model.top_k)


def layer_bytes(model: Model, hosts: int, tokens: int, t: Transport) -> tuple[float, float]:
    """(bytes out of the gateway, bytes into it) for one MoE layer of `tokens` tokens, all hosts together."""
    rows = tokens * hosts * share_touched(model, hosts)
    scale_out = 4 if t.to_experts == "float8_e4m3" else 0
    scale_back = 4 if t.back == "float8_e4m3" else 0
    out = rows * (model.hidden * WIRE_BYTES[t.to_experts] + scale_out + model.top_k * 8)
    back = rows * (model.hidden * WIRE_BYTES[t.back] + scale_back)
    return out, back


def layer_seconds(model: Model, hosts: int, tokens: int, rate_bit_s: float, rtt_s: float, t: Transport) -> float:
    """t_layer of the module docstring."""
    out, back = layer_bytes(model, hosts, tokens, t)
    return rtt_s + t.call_overhead_s + max(max(out, back) / (rate_bit_s / 8), (out + back) / t.wire_cap_bytes_s)


def tok_per_s(model: Model, hosts: int, tokens: int, rate_bit_s: float, rtt_s: float, t: Transport) -> float:
    """Tokens per second when every step is `tokens` tokens through all MoE layers (transport only)."""
    return tokens / (model.moe_layers * layer_seconds(model, hosts, tokens, rate_bit_s, rtt_s, t))


def tables(t: Transport, prefill_tokens: int = 4096, decode_batch: int = 64) -> str:
    """Markdown tables: prefill and decode tok/s per model, hosts, rate and RTT."""
    out = []
    for model in MODELS:
        out.append(f"\n**{model.name}** (H {model.hidden}, {model.experts} experts, top-{model.top_k}, "
                   f"{model.moe_layers} MoE layers), wire {t.to_experts} out / {t.back} back\n")
        out.append("| expert hosts | rows a host gets | Gbit/s | RTT (us) | prefill tok/s (chunks of "
                   f"{prefill_tokens}) | decode tok/s (batch {decode_batch}) | decode ms/token step | "
                   "prefill tok/s at link speed |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        line_rate = replace(t, wire_cap_bytes_s=float("inf"))  # a data plane that keeps up with the link
        for hosts in (2, 4, 8):
            for rate in (10, 25, 100):
                for rtt_us in (50, 200):
                    r, rtt = rate * 1e9, rtt_us * 1e-6
                    pre = tok_per_s(model, hosts, prefill_tokens, r, rtt, t)
                    dec = tok_per_s(model, hosts, decode_batch, r, rtt, t)
                    link = tok_per_s(model, hosts, prefill_tokens, r, rtt, line_rate)
                    out.append(f"| {hosts} | {share_touched(model, hosts):.0%} | {rate} | {rtt_us} | {pre:,.0f} | "
                               f"{dec:,.0f} | {decode_batch / dec * 1e3:.1f} | {link:,.0f} |")
    return "\n".join(out)


def check(path: str, t: Transport) -> str:
    """The model's t_layer for each shaped-link MoE-layer row (busiest link's bytes), beside the measured one (over
    the side channel where the report has it)."""
    with open(path) as f:
        report = json.load(f)
    lines = ["| Gbit/s | RTT (us) | tokens | measured (ms) | in-process compute (ms) | predicted transport "
             "(ms) | predicted + compute (ms) | measured / predicted |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        rate, rtt = run["rate_bit_s"], run["rtt_us"] * 1e-6
        for row in run.get("moe", []):
            v = row["variants"]
            # the gateway's default path over TCP: the side channel (reports before it measured gRPC alone)
            path = "gateway (side channel)" if "gateway (side channel)" in v else "gateway (lanes)"
            measured, compute = v[path]["median"], v["in-process"]["median"]
            # busiest link: its bytes each way, request and reply back to back on one server's link; the
            # gateway's wire cap over both servers' bytes (about 2 x the busiest's)
            each = row["busiest_bytes_each_way"]
            transport = rtt + t.call_overhead_s + max(2 * each / (rate / 8), 4 * each / t.wire_cap_bytes_s)
            # two servers compute their halves side by side: half the in-process time, on an idle machine
            predicted = transport + compute / 2
            lines.append(f"| {rate / 1e9:g} | {rtt * 1e6:g} | {row['tokens']} | {measured * 1e3:.1f} | "
                         f"{compute * 1e3:.1f} | {transport * 1e3:.1f} | {predicted * 1e3:.1f} | "
                         f"{measured / predicted:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the sizing tables, or the check against a shaped-links report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.sizing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--call-overhead-ms", type=float, default=Transport.call_overhead_s * 1e3)
    p.add_argument("--wire-cap-gb-s", type=float, default=Transport.wire_cap_bytes_s / 1e9)
    p.add_argument("--to-experts", default="bfloat16", choices=sorted(WIRE_BYTES))
    p.add_argument("--back", default="bfloat16", choices=sorted(WIRE_BYTES))
    p.add_argument("--check", help="a benchmarks.shaped_links JSON report: predicted vs measured per MoE-layer row")
    args = p.parse_args(argv)
    t = Transport(args.call_overhead_ms / 1e3, args.wire_cap_gb_s * 1e9, args.to_experts, args.back)
    print(check(args.check, t) if args.check else tables(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
