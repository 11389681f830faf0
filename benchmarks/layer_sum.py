"""How the gateway makes a layer's sum from a one-server share split in pieces (gateway/side_dispatch.py).

    python -m benchmarks.layer_sum [--tokens 1024] [--hidden 2048] [--pieces 4] [--threads 1] [--out F]

Three ways, interleaved, medians, fresh random pieces each run:
- `zeros + adds`: a zero-filled [T, H] sum, each piece added into its rows (before round 9);
- `empty + copies`: each piece copied into its rows of an uninitialised sum (pieces read whole);
- `landed`: the pieces already side by side in the gateway's own buffer (tail frames), taken as the sum.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import machine
from benchmarks.timing import interleaved, summary
from moe_client.striping import bounds


def variants(pieces: list[torch.Tensor], landing: torch.Tensor) -> dict:
    rows = bounds(landing.shape[0], len(pieces))
    shape = landing.shape

    def zeros_adds() -> torch.Tensor:
        out = torch.zeros(shape)
        for (start, stop), piece in zip(rows, pieces, strict=True):
            out[start:stop] += piece
        return out

    def empty_copies() -> torch.Tensor:
        out = torch.empty(shape)
        for (start, stop), piece in zip(rows, pieces, strict=True):
            out[start:stop].copy_(piece)
        return out

    return {"zeros + adds": zeros_adds, "empty + copies": empty_copies, "landed": lambda: landing}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--pieces", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the gateway's own setting)")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    landing = torch.randn(args.tokens, args.hidden)
    pieces = [landing[start:stop].clone() for start, stop in bounds(args.tokens, args.pieces)]
    fns = variants(pieces, landing)
    for name, fn in fns.items():
        if not torch.equal(fn(), landing):
            raise AssertionError(f"{name} did not make the sum")
    times = interleaved(fns, args.repeats, warmup=5)
    rows = {name: summary(seconds) for name, seconds in times.items()}
    mib = args.tokens * args.hidden * 4 / 2**20
    print(f"{args.tokens} x {args.hidden} fp32 ({mib:g} MiB) in {args.pieces} pieces, {args.threads} torch thread(s): "
          + "  ".join(f"{name} {row['median'] * 1e3:.3f} ms" for name, row in rows.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine.describe(), "args": vars(args), "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
