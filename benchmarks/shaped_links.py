"""Expert servers across simulated links: network namespaces, tc rate limits and a delaying relay.

    sudo .venv/bin/python -m benchmarks.shaped_links                  # ~10 min on the 2-core machine
    sudo .venv/bin/python -m benchmarks.shaped_links --rates 1,10 --rtts-us 0,100 --quick

Two namespaces, each joined to this one (the gateway's host) by a veth pair whose both directions a
token bucket (tc tbf, holding --bucket-us of the rate) limits to each rate in turn; an expert server (and,
in the first, the echo server) in each. This kernel has no netem, so each connection goes through
benchmarks.delay_relay on this side, which holds every byte for RTT/2 each way; its own cost is the `direct`
rows (at RTT 0) against the same paths through the relay, and benchmarks.relay_cost. Measured per
(rate, RTT), medians over repeats, variants interleaved:
- transport: RunExperts-sized echoes (hidden 2048, fp32) by gRPC over one connection and over the
  gateway's lanes (moe_client.striping), and over the TCP side channel (rpc/side_channel.py) with one
  connection and with lanes; bytes/s as a share of the rate, and time against RTT + bytes/rate;
- one MoE layer (hidden 2048 as DeepSeek-MoE-16B, small experts so this machine's compute stays small)
  over both servers through the gateway's ExpertDispatcher, by gRPC and over the side channel, against
  RTT + the busiest link's bytes/rate;
- Generate of a small causal LM (tiny mixtral, hidden 512) through a real gateway process (side channel,
  its default): tok/s.
Every server's side channel has a fixed port with a relay of its own on this side at the same port
number, since a gateway reaches it at the host of the server's address (the relay's) and the port
GetInfo announces.
Everything it makes (namespaces, links, qdiscs, processes) is removed on exit, on error and after
--time-limit seconds (SIGALRM). The JSON report goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from benchmarks import machine
from benchmarks.model import LAYER, InProcess, Shape, ensure_checkpoint, make_input, moe_layer, owner_table
from benchmarks.procs import ENV, _python
from benchmarks.relay_cost import Relay
from benchmarks.timing import interleaved, summary
from benchmarks.transport import payload, side_call
from moe_client import GatewayClient, zerocopy
from moe_client.channel import insecure_aio_channel
from moe_client.striping import DEFAULT_LANES, LANE_OPTIONS, Lanes
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.pool import PoolOptions, ServerPool
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.codec import to_wire
from moe_serve.rpc.side_channel import SideLink
from tests.support import ROOT
from tests.support.launch import launch, stop_all
from tests.support.netns import AVAILABLE, NetNamespace
from tests.support.threads import LoopThread

HIDDEN = 2048
LAYER_SHAPE = Shape(hidden=HIDDEN, width=64, experts=16, top_k=6)  # DeepSeek's hidden; experts kept small
EXPERT_PORT, ECHO_PORT = 50051, 50061
# The gateway's --tcp-min-piece-bytes and --tcp-pieces-per-lane to try beside the defaults (1 MiB, 1): pieces of 512
# KiB or more, 2 a link sent in order, so one piece's reply comes back while the next one's request still goes out on
# the full-duplex link (a 4 MiB call in 8 pieces; with the defaults, 4 pieces that share the link going and coming).
IN_ORDER = {"min_piece_bytes": 512 << 10, "per_lane": 2}
SIDE_PORTS = {"layer0": 50071, "layer1": 50072, "lm0": 50073, "lm1": 50074, "echo": 50075}  # side channels


def _echo_call(lanes: Lanes, loop: LoopThread, tokens: int):
    x, ids, w = payload(HIDDEN, 6, tokens, torch.float32)
    request = zerocopy.RunExpertsRequest(layer=0, hidden=to_wire(x), expert_ids=to_wire(ids), weights=to_wire(w))

    async def call():
        return await lanes(request, timeout=120)

    return lambda: loop.run(call())


def _lanes(loop: LoopThread, address: str, n: int) -> Lanes:
    async def open_() -> Lanes:
        channels = [insecure_aio_channel(address, LANE_OPTIONS) for _ in range(n)]
        for c in channels:
            await asyncio.wait_for(c.channel_ready(), 30)
        return Lanes(channels, method="/moe.bench.Echo/RunExperts")
    return loop.run(open_())


def transport(loop: LoopThread, echo: str, echo_side: str, rate: float, rtt_us: float, tokens_list: list[int],
              repeats: int, direct: bool) -> list[dict]:
    """Echo round trips by gRPC and over the side channel, over one connection and over lanes; share of the rate
    and of the physical limit."""
    relay, side_relay = Relay(echo, rtt_us), Relay(echo_side, rtt_us)
    paths = {"1 connection": _lanes(loop, relay.address, 1), "lanes": _lanes(loop, relay.address, DEFAULT_LANES)}
    if direct:
        paths["direct, 1 connection"] = _lanes(loop, echo, 1)
    side = [SideLink(side_relay.address, tcp=True, max_bytes=1 << 30) for _ in range(DEFAULT_LANES)]
    side_direct = [SideLink(echo_side, tcp=True, max_bytes=1 << 30) for _ in range(DEFAULT_LANES if direct else 0)]
    try:
        rows = []
        for tokens in tokens_list:
            variants = {name: _echo_call(lanes, loop, tokens) for name, lanes in paths.items()}
            variants |= {"side channel, 1 connection": side_call(side[:1], HIDDEN, tokens),
                         "side channel, lanes": side_call(side, HIDDEN, tokens),
                         "side channel, lanes, 2 pieces a lane": side_call(side, HIDDEN, tokens, **IN_ORDER)}
            if side_direct:  # the relay's own cost on the side channel: the same frames without it
                variants["side channel, direct, 1 connection"] = side_call(side_direct[:1], HIDDEN, tokens)
                variants["side channel, direct, lanes"] = side_call(side_direct, HIDDEN, tokens)
            times = interleaved(variants, repeats, warmup=1)
            nbytes = tokens * HIDDEN * 4  # each way (ids and weights add 48 bytes a token)
            limit = rtt_us / 1e6 + 2 * nbytes * 8 / rate  # request, then reply, each at the rate
            row = {"tokens": tokens, "bytes_each_way": nbytes, "limit_s": limit, "variants": {}}
            for name, seconds in times.items():
                s = summary(seconds)
                s["share_of_rate"] = (2 * nbytes * 8 / rate) / max(s["median"] - rtt_us / 1e6, 1e-9)
                s["share_of_limit"] = limit / s["median"]
                row["variants"][name] = s
            rows.append(row)
        return rows
    finally:
        for lanes in paths.values():
            loop.run(lanes.close())
        for link in side + side_direct:
            link.close()
        relay.close()
        side_relay.close()


def _busiest_bytes(x: torch.Tensor, router: torch.Tensor, workers: int) -> int:
    """Bytes each way on the busiest server's link for one layer call: routed rows x (H x 4 + K x 8)."""
    from moe_serve.core.routing import route, router_logits

    _, ids = route(router_logits(x, router), LAYER_SHAPE.top_k, renormalize=False)
    owner = owner_table(LAYER_SHAPE, workers)[ids]  # [T, K]
    rows = [int((owner == s).any(dim=1).sum()) for s in range(workers)]
    return max(rows) * (HIDDEN * 4 + LAYER_SHAPE.top_k * 8)


def _relays(servers: list[str], side_ports: list[int], rtt_us: float) -> list[Relay]:
    """A relay to each server's gRPC port, and one to its side channel at the same port number on this side."""
    relays = [Relay(s, rtt_us) for s in servers]
    return relays + [Relay(f"{s.rsplit(':', 1)[0]}:{port}", rtt_us, port=port) for s, port in zip(servers, side_ports,
                                                                                                  strict=True)]


def moe(loop: LoopThread, checkpoint: Path, servers: list[str], side_ports: list[int], rate: float, rtt_us: float,
        tokens_list: list[int], repeats: int, local: InProcess, router: torch.Tensor) -> list[dict]:
    """One MoE layer over both servers through relays, by gRPC and over the side channel, against RTT + the busiest
    link's bytes/rate."""
    relays = _relays(servers, side_ports, rtt_us)
    ckpt = Checkpoint(checkpoint)
    addresses = [r.address for r in relays[:len(servers)]]
    pool = ServerPool(addresses, ckpt.spec, ckpt.fingerprint(), PoolOptions(rpc_timeout=120))
    in_order = ServerPool(addresses, ckpt.spec, ckpt.fingerprint(),
                          PoolOptions(rpc_timeout=120, min_piece_bytes=IN_ORDER["min_piece_bytes"],
                                      pieces_per_lane=IN_ORDER["per_lane"]))
    try:
        for p in (pool, in_order):
            loop.run(p.start(120))
        deadline = time.monotonic() + 30
        while (not all(r.side_link() is not None for p in (pool, in_order) for r in p.members)
               and time.monotonic() < deadline):
            time.sleep(0.05)  # the TCP side links are made off the event loop
        # No arenas: every byte crosses the links.
        paths = {"gateway (lanes)": ExpertDispatcher(ckpt.spec, pool, loop.loop, timeout=120, side_calls=False),
                 "gateway (side channel)": ExpertDispatcher(ckpt.spec, pool, loop.loop, timeout=120),
                 "gateway (side channel, 2 pieces a lane)": ExpertDispatcher(ckpt.spec, in_order, loop.loop,
                                                                             timeout=120)}
        rows = []
        for tokens in tokens_list:
            x = make_input(LAYER_SHAPE, tokens)
            want = moe_layer(x, router, LAYER_SHAPE.top_k, local)
            for name, gateway in paths.items():
                if not torch.allclose(moe_layer(x, router, LAYER_SHAPE.top_k, gateway), want, rtol=1e-4, atol=1e-4):
                    raise AssertionError(f"MoE layer over the links ({name}) differs from in-process at {tokens} "
                                         "tokens")
            variants = {name: lambda x=x, g=gateway: moe_layer(x, router, LAYER_SHAPE.top_k, g)
                        for name, gateway in paths.items()}
            times = interleaved({**variants, "in-process": lambda x=x: moe_layer(x, router, LAYER_SHAPE.top_k, local)},
                                repeats, warmup=1)
            nbytes = _busiest_bytes(x, router, len(servers))
            rows.append({"tokens": tokens, "busiest_bytes_each_way": nbytes,
                         "limit_s": rtt_us / 1e6 + 2 * nbytes * 8 / rate,
                         "variants": {name: summary(s) for name, s in times.items()}})
        return rows
    finally:
        for p in (pool, in_order):
            loop.run(p.close())
        for r in relays:
            r.close()


def generate(work: Path, causal: Path, servers: list[str], side_ports: list[int], rtt_us: float,
             new_tokens: int) -> dict:
    """Generate through a gateway process whose expert servers sit behind the relays: tok/s, and the time a token."""
    relays = _relays(servers, side_ports, rtt_us)
    gateway = launch("gateway", work / f"gateway-{rtt_us:g}.log", env=ENV, die_with_parent=True, checkpoint=causal,
                     servers=",".join(r.address for r in relays[:len(servers)]), shared_memory=False,
                     log_level="WARNING")
    try:
        gateway.wait_ready(300)
        with GatewayClient(gateway.address, timeout=600) as client:
            prompt = list(range(1, 33))
            list(client.generate(prompt, max_new_tokens=4, ignore_eos=True))  # warm up
            start = time.perf_counter()
            first = None
            count = 0
            for _ in client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True):
                count += 1
                if first is None:
                    first = time.perf_counter() - start
            total = time.perf_counter() - start
        return {"prompt_tokens": len(prompt), "new_tokens": count, "first_token_s": first,
                "decode_tok_per_s": (count - 1) / (total - first) if count > 1 else None}
    finally:
        gateway.stop(30)
        for r in relays:
            r.close()


def _alarm(*_) -> None:
    raise TimeoutError("benchmarks.shaped_links: --time-limit reached; cleaning up")


def main(argv: list[str] | None = None) -> int:
    """Set up, measure every (rate, RTT), tear down; print a summary and write the JSON report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.shaped_links", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1,10,25", help="Gbit/s, comma-separated")
    p.add_argument("--rtts-us", default="0,100,200", help="round-trip times added by the relay (us)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--bucket-us", type=float, default=200.0,
                   help="token bucket of the shaper in us of the rate (at least 64 KiB): a message that fits a full "
                        "bucket passes faster than the rate, so shares at sizes near it overstate a real link's; "
                        "at 10 Gbit/s 200 (the default) is the smallest tried that tc sustains the rate with on 2 "
                        "cores (64 KiB did not)")
    p.add_argument("--parts", default="transport,moe,generate",
                   help="what to measure at each (rate, RTT), comma-separated: transport, moe, generate")
    p.add_argument("--time-limit", type=int, default=1500, help="seconds before everything is torn down")
    p.add_argument("--server-threads", type=int, default=0,
                   help="each expert server's --torch-threads (0, their default: one per core; two servers and "
                        "the gateway then share the cores the in-process row has to itself)")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "shaped-links.json"))
    args = p.parse_args(argv)
    if not AVAILABLE:
        p.error("needs root, iproute2 (ip) and tc")
    parts = {part.strip() for part in args.parts.split(",")}
    if unknown := parts - {"transport", "moe", "generate"}:
        p.error(f"--parts: {', '.join(sorted(unknown))} is not one of transport, moe, generate")
    rates = [float(r) * 1e9 for r in args.rates.split(",")]
    rtts = [float(r) for r in args.rtts_us.split(",")]
    echo_tokens = [8, 128, 512, 1024] if args.quick else [8, 128, 512, 1024, 2048]
    moe_tokens = [16, 512] if args.quick else [16, 512, 2048]
    repeats = 5 if args.quick else 11
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.time_limit)
    info = machine.describe()
    print(f"shaped links on {machine.one_line(info)}", flush=True)
    result = {"command": "python -m benchmarks.shaped_links " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": info, "layer_shape": LAYER_SHAPE.__dict__, "runs": []}
    loop = LoopThread("shaped-links", timeout=600)
    work = Path(tempfile.mkdtemp(prefix="moe-shaped-", dir="/tmp"))
    layer_ckpt = ensure_checkpoint(LAYER_SHAPE, ROOT / "bench-results")
    from tests.support.hf_models import build_checkpoint

    causal = build_checkpoint("mixtral", work / "mixtral", seed=16, hidden_size=512, intermediate_size=256,
                              num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
    local = InProcess(Checkpoint(layer_ckpt), torch.float32)
    router = Checkpoint(layer_ckpt).load(Checkpoint(layer_ckpt).spec.router_name(LAYER))
    try:
        with ExitStack() as stack:
            spaces = [stack.enter_context(NetNamespace()) for _ in range(2)]
            procs = []
            stack.callback(lambda: stop_all(procs, 30))
            for i, ns in enumerate(spaces):
                for name, ckpt, port in ((f"layer{i}", layer_ckpt, EXPERT_PORT), (f"lm{i}", causal, EXPERT_PORT + 1)):
                    spec = Checkpoint(ckpt).spec
                    per = -(-spec.num_experts // 2)
                    experts = f"{i * per}-{min((i + 1) * per, spec.num_experts) - 1}"
                    procs.append(launch("expert-server", work / f"{name}.log", host=ns.ns_ip, port=port,
                                        wrapper=ns.wrapper, env=ENV, die_with_parent=True, checkpoint=ckpt,
                                        experts=experts, name=name, shared_memory=False, log_level="WARNING",
                                        tcp_channel_port=SIDE_PORTS[name], torch_threads=args.server_threads))
            echo = _python("-m", "benchmarks.echo_server", "--unix", f"unix:{work}/echo.sock", "--host",
                           f"{spaces[0].ns_ip}:{ECHO_PORT}", "--side-port", str(SIDE_PORTS["echo"]), label="echo",
                           stdout=subprocess.PIPE, wrapper=spaces[0].wrapper)
            procs.append(echo)
            echo.popen.stdout.readline()
            for proc in procs[:-1]:
                proc.wait_ready(300)
            layer_servers = [f"{ns.ns_ip}:{EXPERT_PORT}" for ns in spaces]
            lm_servers = [f"{ns.ns_ip}:{EXPERT_PORT + 1}" for ns in spaces]
            layer_side, lm_side = [SIDE_PORTS[f"layer{i}"] for i in (0, 1)], [SIDE_PORTS[f"lm{i}"] for i in (0, 1)]
            for rate in rates:
                for ns in spaces:
                    ns.shape(rate, args.bucket_us / 1e6)
                for rtt in rtts:
                    run = {"rate_bit_s": rate, "rtt_us": rtt}
                    if "transport" in parts:
                        run["transport"] = transport(loop, f"{spaces[0].ns_ip}:{ECHO_PORT}",
                                                     f"{spaces[0].ns_ip}:{SIDE_PORTS['echo']}", rate, rtt,
                                                     echo_tokens, repeats, direct=rtt == 0)
                    if "moe" in parts:
                        run["moe"] = moe(loop, layer_ckpt, layer_servers, layer_side, rate, rtt, moe_tokens, repeats,
                                         local, router)
                    if "generate" in parts:
                        run["generate"] = generate(work, causal, lm_servers, lm_side, rtt, 16 if args.quick else 32)
                    result["runs"].append(run)
                    print(summary_lines(run), flush=True)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        signal.alarm(0)
        loop.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"JSON report: {args.out}")
    return 0


def summary_lines(run: dict) -> str:
    """A few lines per (rate, RTT): transport shares, MoE-layer latency against its limit, Generate tok/s."""
    head = f"\n{run['rate_bit_s'] / 1e9:g} Gbit/s, RTT {run['rtt_us']:g} us"
    lines = [head]
    for row in run.get("transport", []):
        parts = [f"{name} {v['median'] * 1e3:.2f} ms ({v['share_of_rate']:.0%} of rate, {v['share_of_limit']:.0%} "
                 f"of limit)" for name, v in row["variants"].items()]
        lines.append(f"  echo {row['bytes_each_way'] / 2**20:.3g} MiB each way, limit {row['limit_s'] * 1e3:.2f} ms: "
                     + "; ".join(parts))
    for row in run.get("moe", []):
        v = row["variants"]
        lines.append(f"  MoE layer {row['tokens']} tok: gateway by gRPC {v['gateway (lanes)']['median'] * 1e3:.2f} ms, "
                     f"over the side channel {v['gateway (side channel)']['median'] * 1e3:.2f} ms "
                     f"({v['gateway (side channel, 2 pieces a lane)']['median'] * 1e3:.2f} with 2 pieces a lane), "
                     f"in-process {v['in-process']['median'] * 1e3:.2f} ms, RTT + bytes/rate "
                     f"{row['limit_s'] * 1e3:.2f} ms")
    if (g := run.get("generate")) is not None:
        lines.append(f"  Generate: first token {g['first_token_s'] * 1e3:.0f} ms, "
                     f"decode {g['decode_tok_per_s']:.1f} tok/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
