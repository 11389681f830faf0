"""Resident memory of an expert server against its share of the experts.

Writes a simple_moe checkpoint whose routed experts are nearly all of its bytes, then starts one
`moe-expert-server` subprocess per case (a sixteenth, a quarter, all of the experts), waits until it
answers health checks, and reads its memory from /proc/PID/status: VmRSS (resident now), RssAnon
(heap: the loaded weights), RssFile (mapped file pages) and VmHWM (peak resident).

    python -m benchmarks.expert_memory [--dir /tmp/moe-mem] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from moe_client import ExpertClient
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.synthetic import SyntheticConfig, write_checkpoint
from tests.support.launch import launch

# 4 MoE layers x 16 experts of 3 x 1024 x 2048 float32 = 24 MiB each: 1.5 GiB of experts.
CONFIG = SyntheticConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_experts=16,
                         num_experts_per_tok=2, seed=0)
CASES = {"1/16 of the experts": "0", "1/4 of the experts": "0-3", "all experts": "0-15"}
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def measure(checkpoint: Path, experts: str) -> dict[str, int]:
    """Start a server owning `experts` of every layer, wait for SERVING, read its memory, stop it."""
    with (tempfile.TemporaryDirectory(prefix="moe-mem-") as tmp,
          launch("expert-server", Path(tmp) / "server.log", console_script=True, checkpoint=checkpoint,
                 experts=experts) as server):
        with ExpertClient(server.wait_ready(300).address) as client:
            owned = sum(len(le.experts) for le in client.info().owned)
        time.sleep(1.0)  # let the allocator settle after loading
        return {"experts_owned": owned, **server.memory(*FIELDS)}


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/moe-expert-memory", help="where to write the checkpoint")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        write_checkpoint(path, CONFIG)
    checkpoint = Checkpoint(path)
    spec = checkpoint.spec
    total = sum(checkpoint.nbytes(n) for n in checkpoint.names)
    experts = sum(checkpoint.nbytes(n) for n in checkpoint.names if spec.is_expert_tensor(n))
    print(f"Checkpoint {path}: {total / 2**20:.0f} MiB, of which routed experts {experts / 2**20:.0f} MiB "
          f"({100 * experts / total:.2f}%), {len(spec.moe_layers)} layers x {spec.num_experts} experts")
    results = {}
    print(f"{'case':<22}{'experts':>8}{'expert MiB':>12}" + "".join(f"{f + ' MiB':>14}" for f in FIELDS))
    for name, selection in CASES.items():
        row = measure(path, selection)
        row["expert_bytes"] = experts * row["experts_owned"] // (len(spec.moe_layers) * spec.num_experts)
        results[name] = row
        print(f"{name:<22}{row['experts_owned']:>8}{row['expert_bytes'] / 2**20:>12.0f}"
              + "".join(f"{row[f] / 2**20:>14.0f}" for f in FIELDS), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_bytes": total, "expert_bytes": experts,
                                               "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
