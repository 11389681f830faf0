"""OpenMP's wait after a parallel region, kept short in moe-serve's processes.

torch's CPU ops run on OpenMP (GNU libgomp in the PyPI wheels). When a parallel region ends, libgomp's
worker threads spin before they sleep, waiting for the next one: 300,000 turns by default, ~4.4 ms of a core
per worker on the 2-core machine and 7-9 ms on the lent 16-core host, after every torch op that went parallel.
Within one computation the next region comes soon and the spin pays; between calls it takes the cores from
whatever runs next, and in a serving process that is the network: the gateway sends and reads a layer's TCP
calls just after its own torch ops, an expert server sends its reply just after computing, and where several
services share a host each one's spinning workers hold the cores the others need. Measured
(docs/deployment-sizing.md, "OpenMP's spin"): on 2 cores an 8 MiB call over the TCP side lanes took 0.7-2.0
ms longer right after a torch copy, 0.2 ms or less at 30,000 turns; a 16-token MoE layer over a shaped 10
Gbit/s link took 1.5-2x less on both hosts; the CPU experts' compute time stayed as it was (10,000 turns cost
9% at 512 tokens on 16 threads: there, too short a spin puts workers to sleep within one computation).

libgomp reads its settings once, when torch loads it: so `moe_serve` sets this when it is imported, before
any of its modules imports torch; a process that imported torch first keeps libgomp's default (its child
processes inherit the setting). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = 30_000  # libgomp's turns of waiting before a worker sleeps (its default: 300,000)


def keep_spin_short(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT to SPIN_COUNT unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set; True if it was set."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
