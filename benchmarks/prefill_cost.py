"""What a prompt chunk adds to a decode step: the measurement behind the gateway's --max-prefill-tokens.

In-process (every expert local, one torch thread, the load benchmark's model): the time of one step
of 32 decoding sequences plus one prompt chunk of P tokens, for growing P. Continuous batching puts
new prompts into the running steps, so P bounds how much a newcomer delays everyone's next token.

    python -m benchmarks.prefill_cost
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.load_cluster import ModelSize, write_checkpoint
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_reference


def step_times(model, experts, decoding: int, chunks: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of one step (`decoding` sequences' next tokens plus a chunk of a new prompt) per chunk
    size; the sizes take turns within each repeat, so a burst of outside load hits all of them alike."""
    caches = model.new_caches([64] * decoding)  # one pool, as the Generate scheduler keeps
    model.forward([torch.randint(0, model.spec.vocab_size, (16,)) for _ in caches], caches, experts)
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(repeats):
        for chunk in chunks:
            tokens = [torch.randint(0, model.spec.vocab_size, (1,)) for _ in caches]
            step_caches = list(caches)
            if chunk:
                tokens.append(torch.randint(0, model.spec.vocab_size, (chunk,)))
                step_caches.append(caches[0].pool.allocate())
            start = time.perf_counter()
            model.forward(tokens, step_caches, experts, last_only=True)
            times[chunk].append(time.perf_counter() - start)
            for cache in caches:  # back to the same position, so every repeat does the same work
                cache.length -= 1
            if chunk:
                step_caches[-1].release()
    return {c: statistics.median(t) for c, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoding", type=int, default=32)
    p.add_argument("--chunks", default="0,16,64,128,256,512,1024")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        model, experts = load_reference(Checkpoint(write_checkpoint(Path(tmp), ModelSize())))
        chunks = [int(c) for c in args.chunks.split(",")]
        times = step_times(model, experts, args.decoding, chunks, args.repeats)
    for chunk, seconds in times.items():
        print(f"{args.decoding} decoding + {chunk:5d} prompt tokens: {seconds * 1000:7.1f} ms a step "
              f"({seconds / times[chunks[0]]:.1f}x)")

if __name__ == "__main__":
    main()
