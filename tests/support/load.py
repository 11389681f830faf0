"""Steady concurrent Forward and Generate callers whose every answer is checked against the in-process
reference on the same weights: the load of the soak script and the fault tests."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import torch

from moe_client import GatewayClient
from moe_serve.core.generation import SamplingParams
from moe_serve.gateway.engine import GatewayEngine
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.loader import load_all_experts, load_dense_model


class Load:
    """Concurrent Forward and Generate callers, each answer checked against the in-process reference.

    Generate is greedy over prompts whose top two logits stay apart by at least `margin` at every step,
    so a last-bit difference in summation order cannot flip a token. `timeout`, each call's deadline,
    is generous: a shared, loaded machine being slow is not what the fault tests look for.
    """

    def __init__(self, address: str, checkpoint: Path, clients: int = 4, tokens: int = 16, timeout: float = 30.0,
                 generate_share: float = 0.5, new_tokens: int = 4, distinct_inputs: int = 16, margin: float = 1e-3):
        ckpt = Checkpoint(checkpoint)
        engine = GatewayEngine(load_dense_model(ckpt), load_all_experts(ckpt))
        rng = np.random.default_rng()
        self.inputs = [rng.standard_normal((tokens, engine.hidden_size), dtype=np.float32)
                       for _ in range(distinct_inputs)]
        self.prompts: list[list[int]] = []
        self.continuations: list[list[int]] = []
        with torch.inference_mode():
            self.expected = [engine.forward(torch.from_numpy(x))[0].numpy() for x in self.inputs]
            while engine.is_causal and generate_share > 0 and len(self.prompts) < distinct_inputs:
                prompt = rng.integers(0, engine.model.spec.vocab_size, size=tokens).tolist()
                out = [t.token_id for t in engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens))]
                logits = engine.prompt_logits([prompt + out[:-1]])[0][len(prompt) - 1:]  # [new_tokens, V]
                top2 = logits.topk(2, dim=-1).values
                if bool(((top2[:, 0] - top2[:, 1]) > margin).all()):
                    self.prompts.append(prompt)
                    self.continuations.append(out)
        self.generate_share = generate_share if self.prompts else 0.0
        self.address, self.clients, self.timeout, self.new_tokens = address, clients, timeout, new_tokens
        self.ok = 0
        self.ok_by_rpc: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []
        self.latencies: list[float] = []
        self.successes: list[float] = []  # completion times (monotonic) of good answers
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        """Start the callers."""
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop the callers and wait for their last calls."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)

    def _call(self, client: GatewayClient, rng: np.random.Generator) -> tuple[str, str | None]:
        """One request, checked: (RPC name, None or what went wrong)."""
        if rng.random() < self.generate_share:
            n = int(rng.integers(len(self.prompts)))
            got = [t.token_id for t in client.generate(self.prompts[n], max_new_tokens=self.new_tokens,
                                                       ignore_eos=True)]
            return "Generate", None if got == self.continuations[n] else "WRONG_ANSWER"
        n = int(rng.integers(len(self.inputs)))
        got = client.forward(self.inputs[n])
        return "Forward", None if np.abs(got - self.expected[n]).max() <= 1e-4 else "WRONG_ANSWER"

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        with GatewayClient(self.address, timeout=self.timeout) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    rpc, problem = self._call(client, rng)
                except grpc.RpcError as err:
                    rpc, problem = "?", f"{err.code().name}: {err.details()}"
                end = time.monotonic()
                with self.lock:
                    if problem is None:
                        self.ok += 1
                        self.ok_by_rpc[rpc] += 1
                        self.latencies.append(end - start)
                        self.successes.append(end)
                    else:
                        self.errors[problem.split(":")[0]] += 1
                        if len(self.first_errors) < 10:
                            self.first_errors.append(problem)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def wait_ok(self, count: int, timeout: float = 120.0) -> None:
        """Block until `count` more good answers arrive; TimeoutError naming the errors otherwise."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.ok}/{target} good answers after {timeout:.0f}s; errors {dict(self.errors)}")
            time.sleep(0.05)

    def longest_gap(self, since: float, until: float | None = None) -> float:
        """Longest time without a good answer between `since` and `until` (monotonic; default now)."""
        until = time.monotonic() if until is None else until
        with self.lock:
            times = [since, *[t for t in self.successes if since <= t <= until]]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def p99_ms(self, last: int = 2000) -> float:
        """99th percentile latency of the last `last` good answers, in ms."""
        with self.lock:
            recent = sorted(self.latencies[-last:])
        return recent[int(0.99 * (len(recent) - 1))] * 1e3 if recent else 0.0
