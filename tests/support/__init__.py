"""Test support shared by tests/, benchmarks/ and scripts/: each helper is written once, here.

    ports            free_port
    waiting          wait_for (poll a condition), wait_serving (gRPC health SERVING)
    launch           ServiceProcess and launch(): expert servers and gateways (and any helper
                     process) as subprocesses: start, wait ready, signal, restart, stop, memory
    process_cluster  ProcessCluster: replicas and a gateway as processes (fault tests, soak)
    load             Load: checked concurrent Forward and Generate callers (fault tests, soak)
    threads          LoopThread (an asyncio loop on its own thread), concurrently
    inprocess        Cluster: expert servers and gateways inside this process (the `cluster` fixture)
    references       the answers to check against: in-process forward, plain-torch experts, greedy
    checkpoints      tiny checkpoints: TINY (simple_moe), the causal set, one with a tokenizer
    hf_models        tiny transformers MoE checkpoints and their logits
    deepseek_ref     a tiny DeepSeek-MoE checkpoint and an independent plain-torch reference
    certs            a throwaway PKI for the TLS tests
    prometheus       a real Prometheus server for the scrape test; the project's scrape config

Import it from the repository root: pytest does (pytest.ini: pythonpath = .), and benchmarks and
scripts run as modules there (`python -m benchmarks.load`, `python -m scripts.soak`). Importing this
package loads nothing heavy; each module imports what it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
BIN = Path(sys.executable).parent  # the environment's console scripts: moe-expert-server, moe-gateway, ...
