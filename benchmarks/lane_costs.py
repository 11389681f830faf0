"""Where a split RunExperts call's time goes beyond the kernel's copies, on this host, with torch RPC beside it.

    python -m benchmarks.lane_costs [--sizes-mib 4,8,16] [--repeats 40] [--rounds 2] [--out F]

The same hidden states ([T, 2048] fp32, T = MiB x 128) echoed by benchmarks.echo_server over the
gateway's TCP side links (rpc/side_channel.py), cut into the gateway's 4 pieces of rows, as:
- `raw, 1 link`: the bytes in one frame, no message (one TCP connection's floor);
- `raw, 4 links`: the bytes in 4 frames on 4 links at once, no message (the lanes' floor);
- `messages, 4 links`: RunExperts requests and replies, built, parsed and answered as the gateway and
  the expert server do (benchmarks.transport.side_echo), each reply read into a frame of its own;
- `messages + copy`: and the 4 replies copied side by side into one tensor (as the gateway copied a
  layer's first share into its sum before tail frames);
- `messages, landed`: the replies' outputs landing side by side in one tensor of ours as they are read
  (tail frames, rpc/frames.py: the gateway's path);
- `copy alone`: that copy of T x 2048 fp32 by itself;
- `torch copy` and `torch copy, then landed`: the same copy by torch (parallel on its OpenMP threads, as the
  gateway's own torch ops are), and a landed call right after it: what the threads that OpenMP leaves
  waiting after a parallel region cost the call (process/openmp.py);
and torch RPC restricted to TCP (TensorPipe's transport between hosts) returning the same tensor, in a
phase of its own. Variants interleaved within a phase; medians over `--rounds` x `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import numpy as np
import torch
import torch.distributed.rpc as rpc

from benchmarks import machine, rpc_worker
from benchmarks.procs import EchoPhase, RpcPhase
from benchmarks.timing import interleaved
from benchmarks.transport import payload, side_echo
from moe_client.striping import DEFAULT_LANES
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.rpc import side_lanes
from moe_serve.rpc.side_channel import SideLink
from tests.support.threads import LoopThread

HIDDEN = 2048
COPIES = ("copy alone", "torch copy")  # no round trip: no ratio to torch RPC


def _round_trip(link: SideLink, data: memoryview) -> memoryview:
    return link.receive(link.send(data), 60)


def echo_variants(phase: EchoPhase, raw_links: list[SideLink], x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> dict:
    """The side-link variants for one payload; each returns the echoed hidden states as one array."""
    data = x.numpy().view(np.uint8).reshape(-1)
    pieces = [memoryview(p.data) for p in np.array_split(data, DEFAULT_LANES)]
    out = np.empty(x.shape, np.float32)

    def raw_one() -> np.ndarray:
        return np.frombuffer(_round_trip(raw_links[0], memoryview(data.data)), np.float32).reshape(x.shape)

    def raw_lanes() -> np.ndarray:
        replies = side_lanes.values(side_lanes.each([partial(_round_trip, link, p) for link, p in zip(raw_links, pieces,
                                                                                            strict=False)]))
        return np.concatenate([np.frombuffer(r, np.float32) for r in replies]).reshape(x.shape)

    def messages() -> list:
        return side_echo(phase.side_links[:DEFAULT_LANES], x, ids, weights, land=False)

    def landed() -> list:
        return side_echo(phase.side_links[:DEFAULT_LANES], x, ids, weights)

    def messages_copied() -> np.ndarray:
        for start, stop, output in messages():
            out[start:stop] = np.frombuffer(output.data, np.float32).reshape(stop - start, -1)
        return out

    def copy_alone() -> np.ndarray:
        np.copyto(out, x.numpy())
        return out

    def torch_copy() -> torch.Tensor:  # parallel on torch's OpenMP threads, as the gateway's own torch ops are
        return torch.from_numpy(out).copy_(x)

    def landed_after_torch() -> list:
        torch_copy()
        return landed()

    return {"raw, 1 link": raw_one, "raw, 4 links": raw_lanes, "messages, 4 links": messages,
            "messages + copy": messages_copied, "messages, landed": landed, "copy alone": copy_alone,
            "torch copy": torch_copy, "torch copy, then landed": landed_after_torch}


def _as_array(result, shape) -> np.ndarray:
    if isinstance(result, list):  # side_echo's (start, stop, output) pieces, in row order
        return np.concatenate([np.frombuffer(output.data, np.float32) for _, _, output in result]).reshape(shape)
    return np.asarray(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="4,8,16")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    keep_large_buffers()  # as the gateway is
    data = {mib: payload(HIDDEN, 6, mib * 128, torch.float32) for mib in map(int, args.sizes_mib.split(","))}
    times: dict[int, dict[str, list[float]]] = {mib: {} for mib in data}

    def add(mib: int, measured: dict) -> None:
        for name, seconds in measured.items():
            times[mib].setdefault(name, []).extend(seconds)

    loop = LoopThread()
    try:
        for _ in range(args.rounds):
            with EchoPhase(loop) as phase:
                raw_links = [SideLink(phase.raw_address, tcp=True, max_bytes=1 << 30) for _ in range(DEFAULT_LANES)]
                try:
                    for mib, (x, ids, w) in data.items():
                        variants = echo_variants(phase, raw_links, x, ids, w)
                        for name, fn in variants.items():
                            if not np.array_equal(_as_array(fn(), x.shape), x.numpy()):
                                raise AssertionError(f"{name} did not echo the hidden states")
                        add(mib, interleaved(variants, args.repeats, warmup=3))
                finally:
                    for link in raw_links:
                        link.close()
            with RpcPhase(workers=1, tcp_only=True) as group:
                for mib, (x, ids, w) in data.items():
                    call = partial(rpc.rpc_sync, group.names[0], rpc_worker.echo, args=(x, ids, w))
                    if not torch.equal(call(), x):
                        raise AssertionError("torch RPC did not echo the hidden states")
                    add(mib, interleaved({"torch RPC tcp-only": call}, args.repeats, warmup=3))
    finally:
        loop.close()
    rows = []
    for mib, variants in times.items():
        medians = {name: statistics.median(seconds) for name, seconds in variants.items()}
        rpc_ms = medians["torch RPC tcp-only"]
        rows.append({"mib": mib, "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
                     "torch_rpc_over": {k: round(rpc_ms / v, 2) for k, v in medians.items() if k not in COPIES},
                     "n": {k: len(v) for k, v in variants.items()}})
        cells = "  ".join(f"{k} {v * 1e3:.2f}" for k, v in medians.items())
        print(f"{mib:3d} MiB (ms): {cells}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine.describe(), "repeats": args.repeats, "rounds": args.rounds,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
