"""What the OpenAI HTTP front end (moe-openai) costs over calling the gateway's gRPC Generate directly.

    python -m benchmarks.openai_frontend [--repeats 20] [--tokens 32] [--streams 64] [--seconds 20]

One expert server, a gateway and moe-openai on loopback, serving the embedded causal LM
(create-model --causal-lm). Two measurements, each alternating the two paths:

1. Added latency per streamed token: the same greedy request (prompt ids, `--tokens` tokens, a
   log-prob per token on both paths so every token is its own message) streamed through gRPC Generate
   and through POST /v1/completions (stream, raw SSE). For token i, the median over repeats of its
   arrival time after the request was sent; the added latency is the median over i of (HTTP - gRPC).
2. Throughput with `--streams` concurrent streams, each asking for 16 tokens again and again for
   `--seconds` seconds: requests/s and tokens/s through HTTP, and through gRPC for comparison.

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


async def grpc_stream(stub, tokens: int) -> list[float]:
    """Arrival times (s after sending) of each token through gRPC Generate."""
    start = time.perf_counter()
    times = []
    request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_new_tokens=tokens, ignore_eos=True,
                                          logprobs=True)
    async for _ in stub.Generate(request):
        times.append(time.perf_counter() - start)
    return times


async def http_stream(client: httpx.AsyncClient, tokens: int) -> list[float]:
    """Arrival times (s after sending) of each token's SSE event through moe-openai."""
    body = {"model": "tiny-lm", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter() - start)
    return times


async def latency(stub, client, repeats: int, tokens: int) -> dict:
    runs = {"grpc": [], "http": []}
    for _ in range(repeats):
        runs["grpc"].append(await grpc_stream(stub, tokens))
        runs["http"].append(await http_stream(client, tokens))
    per_token = {k: [statistics.median(r[i] for r in v) for i in range(tokens)] for k, v in runs.items()}
    added = [h - g for h, g in zip(per_token["http"], per_token["grpc"], strict=True)]

    def itl(v):
        return statistics.median(b - a for r in v for a, b in itertools.pairwise(r)) * 1e3

    return {"added_ms_p50": statistics.median(added) * 1e3, "ttft_ms": {k: v[0] * 1e3 for k, v in per_token.items()},
            "itl_ms_p50": {k: itl(v) for k, v in runs.items()}, "repeats": repeats, "tokens": tokens}


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
    return {"requests_per_s": done["requests"] / wall, "tokens_per_s": done["tokens"] / wall, "streams": streams}


async def measure(gateway: str, url: str, args) -> dict:
    async with insecure_aio_channel(gateway) as channel, httpx.AsyncClient(
            base_url=url, timeout=300, limits=httpx.Limits(max_connections=args.streams + 8)) as client:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        await grpc_stream(stub, 4)  # warm both paths
        await http_stream(client, 4)
        result = {"latency": await latency(stub, client, args.repeats, args.tokens)}
        result["load_http"] = await load(lambda: http_stream(client, 16), args.streams, args.seconds)
        result["load_grpc"] = await load(lambda: grpc_stream(stub, 16), args.streams, args.seconds)
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
            result = asyncio.run(measure(gateway.address, wait_http(front), args))
        except grpc.RpcError as err:
            raise SystemExit(f"gRPC error: {err}\n{gateway.output()}") from err
        finally:
            stop_all([front, gateway, expert])
    lat = result["latency"]
    print(f"added latency per streamed token, HTTP vs gRPC (p50 over {lat['tokens']} tokens, median of "
          f"{lat['repeats']} runs each): {lat['added_ms_p50']:.2f} ms")
    print(f"  first token: gRPC {lat['ttft_ms']['grpc']:.1f} ms, HTTP {lat['ttft_ms']['http']:.1f} ms; "
          f"inter-token p50: gRPC {lat['itl_ms_p50']['grpc']:.2f} ms, HTTP {lat['itl_ms_p50']['http']:.2f} ms")
    for path in ("http", "grpc"):
        r = result[f"load_{path}"]
        print(f"{r['streams']} concurrent streams of 16 tokens through {path}: {r['requests_per_s']:.1f} requests/s, "
              f"{r['tokens_per_s']:.0f} tokens/s")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "openai-frontend.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
