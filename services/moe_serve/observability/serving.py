"""The gateway's serving metrics, named as serving dashboards expect them (vLLM's, with the moe_ prefix).

Histograms per Generate request: time to first token, inter-token latency, end to end, queue time
(waiting for a slot), prefill (slot to first token) and decode (first to last token). Gauges read at
scrape time: requests running and waiting, KV-cache tokens held. Counters: prompt and generated
tokens, and finished requests by finish reason (a request cancelled or failed is not a success; it is
in moe_requests_total{code}).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

# 1 ms (a token of a tiny model) to 2 min (a long generation): the request-level histograms.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# 0.5 ms to 2.5 s between two tokens of a stream.
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
FINISH_REASONS = ("stop", "length")

Load = Callable[[], tuple[int, int, int]]  # (running, waiting, KV-cache tokens)


class _LoadCollector:
    """moe_num_requests_running / _waiting and moe_kv_cache_tokens, read from the engine when scraped."""

    def __init__(self) -> None:
        self.load: Load = lambda: (0, 0, 0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting, kv = self.load()
        yield GaugeMetricFamily("moe_num_requests_running", "Generate requests decoding or prefilling now",
                                value=running)
        yield GaugeMetricFamily("moe_num_requests_waiting", "Generate requests waiting for a slot", value=waiting)
        yield GaugeMetricFamily("moe_kv_cache_tokens", "Tokens held in the KV caches of running requests", value=kv)


class ServingMetrics:
    """The serving metrics of one gateway, in its registry."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.ttft = Histogram("moe_time_to_first_token_seconds", "Generate: request received to first token sent",
                              buckets=REQUEST_BUCKETS, registry=r)
        self.itl = Histogram("moe_inter_token_latency_seconds", "Generate: time between two tokens of a stream",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("moe_e2e_request_latency_seconds", "Generate: request received to last token sent",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("moe_request_queue_time_seconds", "Generate: time waiting for a slot",
                               buckets=REQUEST_BUCKETS, registry=r)
        self.prefill = Histogram("moe_request_prefill_time_seconds", "Generate: slot to first token (the prompt)",
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.decode = Histogram("moe_request_decode_time_seconds", "Generate: first token to last token",
                                buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt tokens of Generate requests admitted", registry=r)
        self.generation_tokens = Counter("moe_generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("moe_request_success", "Generate requests finished, by finish reason",
                               ["finish_reason"], registry=r)
        self._success = {reason: self.success.labels(reason) for reason in FINISH_REASONS}
        self._load = _LoadCollector()
        r.register(self._load)

    def watch(self, load: Load) -> None:
        """Where the gauges come from: (running, waiting, KV-cache tokens) of the engine, read at scrape time."""
        self._load.load = load

    def request(self, prompt_tokens: int) -> RequestTimer:
        """Start timing one Generate request (now is its arrival)."""
        self.prompt_tokens.inc(prompt_tokens)
        return RequestTimer(self)


class RequestTimer:
    """One request's timeline: arrival, slot, first token, each token, the end."""

    def __init__(self, metrics: ServingMetrics):
        self.m = metrics
        self.arrival = time.perf_counter()
        self.first: float | None = None
        self.last = self.arrival

    def token(self, admitted: float | None) -> None:
        """A token is going out now; `admitted` is when the request got its slot (perf_counter)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            slot = admitted if admitted is not None else self.arrival
            self.m.ttft.observe(now - self.arrival)
            self.m.queue.observe(max(0.0, slot - self.arrival))
            self.m.prefill.observe(max(0.0, now - slot))
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.m.generation_tokens.inc()

    def finish(self, reason: str) -> None:
        """The last token went out with finish reason `reason` ("stop" or "length")."""
        self.m.e2e.observe(self.last - self.arrival)
        self.m.decode.observe(self.last - (self.first if self.first is not None else self.last))
        self.m._success[reason].inc()
