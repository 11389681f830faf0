"""What the OpenAI HTTP front end (moe-openai) costs over calling the gateway's gRPC Generate directly.

    python -m benchmarks.openai_frontend [--repeats 20] [--tokens 32] [--streams 64] [--seconds 20]

One expert server, a gateway and moe-openai on loopback, serving the embedded causal LM
(create-model --causal-lm). Two measurements, each alternating the two paths:

1. Added latency per streamed token, paired: a gRPC Generate stream and an HTTP stream (POST
   /v1/completions, raw SSE, a log-prob per token on both paths so every token is its own message)
   run at the same time, so the gateway's continuous batching makes a token of each in every decode
   step. Each HTTP token's arrival minus the arrival of the last gRPC token before it (the same step's,
   as long as the front end adds less than a step) is what the front end adds to that token; the p50
   over all tokens of `--repeats` pairs. Comparing separate runs instead would drown a millisecond in
   the run-to-run spread of a loaded machine.
2. Throughput with `--streams` concurrent streams, each asking for 16 tokens again and again for
   `--seconds` seconds: requests/s and tokens/s through HTTP, and through gRPC for comparison, with
   the CPU time the front end and the gateway processes spent per streamed token (what a loaded
   machine's scheduling delays do not change).

Prints a table and writes bench-results/openai-frontend.json. A benchmark, not a test: the numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import httpx2 as httpx

from moe_client.channel import insecure_aio_channel
from moe_client.pb import gateway_pb2, gateway_pb2_grpc
from moe_serve.model.synthetic_lm import write_causal_lm
from tests.support import ROOT
from tests.support.http import wait_http
from tests.support.launch import launch, stop_all

PROMPT = [17, 230, 41, 99, 5, 300, 12, 77]


async def grpc_stream(stub, tokens: int, start: float | None = None) -> list[float]:
    """Arrival times (s after `start`, default: sending) of each token through gRPC Generate."""
    start = time.perf_counter() if start is None else start
    times = []
    request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_new_tokens=tokens, ignore_eos=True,
                                          logprobs=True)
    async for _ in stub.Generate(request):
        times.append(time.perf_counter() - start)
    return times


async def http_stream(client: httpx.AsyncClient, tokens: int, start: float | None = None) -> list[float]:
    """Arrival times (s after `start`, default: sending) of each token's SSE event through moe-openai."""
    body = {"model": "tiny-lm", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    start = time.perf_counter() if start is None else start
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter() - start)
    return times


async def latency(stub, client, repeats: int, tokens: int) -> dict:
    added, ttft, itl = [], {"grpc": [], "http": []}, {"grpc": [], "http": []}
    for _ in range(repeats):
        start = time.perf_counter()  # the gRPC stream runs longer, so every HTTP token has gRPC company
        runs = await asyncio.gather(grpc_stream(stub, tokens + 16, start), http_stream(client, tokens, start))
        grpc_times, http_times = runs
        for name, times in zip(("grpc", "http"), runs, strict=True):
            ttft[name].append(times[0])
            itl[name] += [b - a for a, b in itertools.pairwise(times)]
        for h in http_times:
            before = [g for g in grpc_times if g <= h]
            if before:
                added.append(h - before[-1])
    return {"added_ms_p50": statistics.median(added) * 1e3, "added_ms_p90": statistics.quantiles(added, n=10)[-1] * 1e3,
            "ttft_ms_p50": {k: statistics.median(v) * 1e3 for k, v in ttft.items()},
            "itl_ms_p50": {k: statistics.median(v) * 1e3 for k, v in itl.items()}, "repeats": repeats,
            "tokens": tokens, "paired_tokens": len(added)}


async def load(call, streams: int, seconds: float) -> dict:
    done = {"requests": 0, "tokens": 0}
    end = time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < end:
            tokens = len(await call())  # awaited first: `+=` would read the count before the await
            done["tokens"] += tokens
            done["requests"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - start
    return {"requests_per_s": done["requests"] / wall, "tokens_per_s": done["tokens"] / wall, "streams": streams,
            "tokens": done["tokens"]}


async def measure(gateway: str, url: str, args, procs: dict) -> dict:
    async with insecure_aio_channel(gateway) as channel, httpx.AsyncClient(
            base_url=url, timeout=300, limits=httpx.Limits(max_connections=args.streams + 8)) as client:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        await grpc_stream(stub, 4)  # warm both paths
        await http_stream(client, 4)
        result = {"latency": await latency(stub, client, args.repeats, args.tokens)}
        for path, call in (("http", lambda: http_stream(client, 16)), ("grpc", lambda: grpc_stream(stub, 16))):
            cpu = {name: p.cpu_seconds() for name, p in procs.items()}
            r = result[f"load_{path}"] = await load(call, args.streams, args.seconds)
            r["cpu_ms_per_token"] = {name: (p.cpu_seconds() - cpu[name]) * 1e3 / r["tokens"]
                                     for name, p in procs.items()}
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_causal_lm(Path(tmp) / "tiny-lm")
        logs = Path(tmp)
        expert = launch("expert-server", logs / "e.log", checkpoint=model, experts="all", log_level="WARNING")
        gateway = launch("gateway", logs / "gw.log", checkpoint=model, servers=[expert.address], log_level="WARNING",
                         max_running_requests=args.streams)
        front = launch("openai", logs / "oa.log", checkpoint=model, gateway=gateway.address, log_level="WARNING")
        try:
            gateway.wait_ready()
            result = asyncio.run(measure(gateway.address, wait_http(front), args,
                                         {"front end": front, "gateway": gateway}))
        except grpc.RpcError as err:
            raise SystemExit(f"gRPC error: {err}\n{gateway.output()}") from err
        finally:
            stop_all([front, gateway, expert])
    lat = result["latency"]
    print(f"added latency per streamed token, HTTP vs gRPC in the same decode steps ({lat['paired_tokens']} tokens "
          f"of {lat['repeats']} pairs): p50 {lat['added_ms_p50']:.2f} ms, p90 {lat['added_ms_p90']:.2f} ms")
    print(f"  first token p50: gRPC {lat['ttft_ms_p50']['grpc']:.1f} ms, HTTP {lat['ttft_ms_p50']['http']:.1f} ms; "
          f"inter-token p50: gRPC {lat['itl_ms_p50']['grpc']:.2f} ms, HTTP {lat['itl_ms_p50']['http']:.2f} ms")
    for path in ("http", "grpc"):
        r = result[f"load_{path}"]
        cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in r["cpu_ms_per_token"].items())
        print(f"{r['streams']} concurrent streams of 16 tokens through {path}: {r['requests_per_s']:.1f} requests/s, "
              f"{r['tokens_per_s']:.0f} tokens/s; CPU ms per token: {cpu}")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "openai-frontend.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
