"""N concurrent greedy Generate streams against a gateway, from this process: tokens/s and inter-token latency.

Run by benchmarks/gpu_measures.generate_streams in a process of its own, so the clients' threads do not
share the benchmarked gateway's GIL; prints one JSON line.

    python -m benchmarks.stream_clients ADDRESS VOCAB STREAMS PROMPT_LEN NEW_TOKENS [TIMEOUT]
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from moe_client import GatewayClient


def generate_streams(address: str, vocab: int, streams: int, prompt_len: int, new_tokens: int,
                     timeout: float = 600.0) -> dict:
    """`streams` concurrent greedy Generate calls through the gateway's gRPC API: generated tokens/s over
    the whole run, and inter-token latency (gaps between a stream's tokens) p50 / p99 in ms."""
    rng = np.random.default_rng(streams)
    prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(streams)]
    gaps: list[list[float]] = [[] for _ in range(streams)]
    counts = [0] * streams
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams + 1)

    def one(i: int) -> None:
        try:
            with GatewayClient(address, timeout=timeout) as client:
                barrier.wait()
                last = None
                for _ in client.generate(prompts[i], max_new_tokens=new_tokens, ignore_eos=True):
                    now = time.perf_counter()
                    if last is not None:
                        gaps[i].append(now - last)
                    last = now
                    counts[i] += 1
        except BaseException as err:  # reported with the row
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    itl = sorted(g for gs in gaps for g in gs)
    return {"streams": streams, "tokens": sum(counts), "tokens_per_s": sum(counts) / seconds,
            "itl_p50_ms": itl[len(itl) // 2] * 1e3 if itl else None,
            "itl_p99_ms": itl[min(len(itl) - 1, int(len(itl) * 0.99))] * 1e3 if itl else None}


def main() -> None:
    address, vocab, streams, prompt_len, new_tokens = sys.argv[1], *(int(a) for a in sys.argv[2:6])
    timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 600.0
    print(json.dumps(generate_streams(address, vocab, streams, prompt_len, new_tokens, timeout)))


if __name__ == "__main__":
    main()
