"""Prometheus metrics of one service instance, served over HTTP at /metrics.

Each ServiceMetrics owns its registry (not prometheus_client's global one), so several servers in
one process, as in the tests, keep their numbers apart. Names follow Prometheus conventions:
`moe_` prefix, base units, `_total` / `_seconds` / `_bytes`. Labels take bounded values only
(RPC names, status codes, layer and expert ids, server names, devices), never request ids.

Most of the numbers come from MetricsInterceptor, which wraps every RPC of the named services
without the servicers knowing; the servicers add what only they know (tokens, per-expert counts,
compute seconds), and the gateway times each RunExperts call through `call_expert`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from moe_serve.observability.collectors import DeviceMemoryCollector, ExpertTokenCounter
from moe_serve.process.env import env
from moe_serve.process.handoff import ContextThreadPool
from moe_serve.rpc import request_ids

log = logging.getLogger(__name__)

# 0.5 ms (a tiny RunExperts on loopback) to 2 min (a long Generate on a big model).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(17))  # 1 .. 65,536 tokens per call


class ServiceMetrics:
    """Every metric of one service (gateway or expert server), in a registry of its own."""

    def __init__(self, service: str):
        disable_created_metrics()  # no *_created series: they double the series count and no panel uses them
        self.service = service
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moe_requests", "RPCs handled, by method and gRPC status code",
                                ["rpc", "code"], registry=r)
        self.request_seconds = Histogram("moe_request_duration_seconds",
                                         "Time from receiving an RPC to its reply, inside this server",
                                         ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("moe_requests_in_flight", "RPCs being handled now", ["rpc"], registry=r)
        self.received_bytes = Counter("moe_received_bytes", "Serialized request bytes received", ["rpc"], registry=r)
        self.sent_bytes = Counter("moe_sent_bytes", "Serialized reply bytes sent", ["rpc"], registry=r)
        self.tokens = Counter("moe_tokens", "Tokens processed", ["rpc"], registry=r)
        self.batch_tokens = Histogram("moe_batch_tokens", "Tokens per call (the batch size)", ["rpc"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram("moe_queue_wait_seconds", "Time a request waited for a compute worker",
                                    buckets=LATENCY_BUCKETS, registry=r)
        # Expert servers: the load a user balances placement by, and the time spent computing.
        self.expert_tokens = ExpertTokenCounter()
        r.register(self.expert_tokens)
        self.expert_compute = Histogram("moe_expert_compute_seconds",
                                        "Seconds computing experts per RunExperts call (no decode, encode, queue)",
                                        ["layer"], buckets=LATENCY_BUCKETS, registry=r)
        self.call_stage = Histogram("moe_expert_call_stage_seconds", "Seconds of each stage of a RunExperts call "
                                    "around the compute: prepare (decode, map shared memory, checks), finish "
                                    "(wait for the compute, write or encode the sums)", ["stage"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.weight_bytes = Gauge("moe_weight_bytes", "Bytes of model weights held, by device", ["device"],
                                  registry=r)
        # Gateway: each RunExperts call it makes, as it sees them.
        self.expert_calls = Counter("moe_expert_calls", "RunExperts calls made to expert servers, by status",
                                    ["server", "code"], registry=r)
        self.expert_call_seconds = Histogram("moe_expert_call_duration_seconds",
                                             "RunExperts round trip seen from the gateway", ["server"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.expert_call_sent_bytes = Counter("moe_expert_call_sent_bytes", "RunExperts request bytes sent",
                                              ["server"], registry=r)
        self.expert_call_received_bytes = Counter("moe_expert_call_received_bytes",
                                                  "RunExperts reply bytes received", ["server"], registry=r)
        # Gateway: whether it can serve every expert (its health is NOT_SERVING while unserved > 0).
        self.expert_server_up = Gauge("moe_expert_server_up", "1 while an expert server is SERVING and usable, "
                                      "else 0; one series per expert server the gateway knows", ["server"],
                                      registry=r)
        self.unserved_experts = Gauge("moe_unserved_experts", "(layer, expert) pairs with no live replica",
                                      registry=r)
        self.info = Info("moe_server", "What this service is and serves", registry=r)
        self.info.info({"service": service})
        ProcessCollector(registry=r)
        r.register(DeviceMemoryCollector())
        self._http = None
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}

    def child(self, metric, *labels: str):
        """metric.labels(*labels), remembered: a dict lookup instead of the library's locked one per call."""
        key = (id(metric), labels)  # the metrics live as long as self
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def describe(self, **labels: str) -> None:
        """Set the moe_server_info labels (name, model fingerprint, ...): static, bounded values."""
        self.info.info({"service": self.service, **{k: str(v) for k, v in labels.items()}})

    def init_rpc(self, rpc: str) -> None:
        """Create the series of `rpc` at zero, so that rates exist from the first request on."""
        self.requests.labels(rpc, "OK")
        self.request_seconds.labels(rpc)
        self.in_flight.labels(rpc)
        self.received_bytes.labels(rpc)
        self.sent_bytes.labels(rpc)

    def init_experts(self, owned: dict[int, tuple[int, ...]]) -> None:
        """Create every owned (layer, expert) series at zero: an expert nobody routes to shows as 0, not absent."""
        for layer, experts in owned.items():
            self.expert_compute.labels(str(layer))
            self.expert_tokens.hold(layer, experts)

    def record_call(self, rpc: str, code: str, seconds: float, received: int, sent: int,
                    access_log_level: int = logging.DEBUG) -> None:
        """One call served outside gRPC (the same-host channel), counted and logged as the interceptor does
        RPCs (the caller binds the request id)."""
        log.log(access_log_level, "%s %s in %.1f ms", rpc, code, seconds * 1e3)
        self.child(self.requests, rpc, code).inc()
        self.child(self.request_seconds, rpc).observe(seconds)
        self.child(self.received_bytes, rpc).inc(received)
        self.child(self.sent_bytes, rpc).inc(sent)

    def observe_batch(self, rpc: str, tokens: int) -> None:
        """One call processed `tokens` tokens."""
        self.child(self.tokens, rpc).inc(tokens)
        self.child(self.batch_tokens, rpc).observe(tokens)

    def observe_tokens(self, rpc: str, tokens: int = 1) -> None:
        """More tokens of a call already counted by observe_batch: Generate's new tokens, as they come."""
        self.child(self.tokens, rpc).inc(tokens)

    def observe_compute(self, layer: int, seconds: float) -> None:
        """One computation of `layer`'s experts took `seconds` (its tokens per expert are the bank's tallies,
        read through expert_tokens)."""
        self.child(self.expert_compute, str(layer)).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One RunExperts call spent `seconds` in `stage` (prepare or finish)."""
        self.child(self.call_stage, stage).observe(seconds)

    async def run_queued(self, executor: ContextThreadPool, fn: Callable, *args):
        """`fn(*args)` on `executor`, timing the wait for a worker; the executor carries the request's
        contextvars (id, deadline) to the worker."""
        submitted = time.perf_counter()

        def job():
            self.queue_wait.observe(time.perf_counter() - submitted)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(executor, job)

    async def call_expert(self, server: str, method: Callable[..., Awaitable], request, **kwargs):
        """`await method(request, **kwargs)` (a RunExperts stub call), recording latency, status and bytes."""
        start = time.perf_counter()
        code, reply = "UNKNOWN", None
        try:
            reply = await method(request, **kwargs)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.record_expert_call(server, code, time.perf_counter() - start, request.ByteSize(),
                                    reply.ByteSize() if reply is not None else 0)
        return reply

    def record_expert_call(self, server: str, code: str, seconds: float, sent: int, received: int) -> None:
        """One RunExperts call to `server` (over gRPC or the same-host channel): status, latency, bytes."""
        self.child(self.expert_call_sent_bytes, server).inc(sent)
        self.child(self.expert_call_seconds, server).observe(seconds)
        self.child(self.expert_calls, server, code).inc()
        if received:
            self.child(self.expert_call_received_bytes, server).inc(received)

    def serve(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Start the HTTP /metrics endpoint on a daemon thread; returns the bound port (0 picks one)."""
        if self._http is None:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def expose(self, host: str, port: int) -> str:
        """Serve /metrics on host:port unless port is 0; returns where, for the startup summary."""
        if not port:
            return "off (--metrics-port / MOE_METRICS_PORT to serve /metrics)"
        return f"http://{host}:{self.serve(host, port)}/metrics"

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and logs every RPC of `services`, and makes the caller's request id current."""

    def __init__(self, metrics: ServiceMetrics, services: Iterable[str], access_log_level: int = logging.DEBUG,
                 make_request_ids: bool = False):
        self.metrics = metrics
        self.services = set(services)
        self.access_log_level = access_log_level
        self.make_request_ids = make_request_ids  # the public entry point names requests that come unnamed
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        for name in self.services:
            try:
                methods = descriptor_pool.Default().FindServiceByName(name).methods
            except KeyError:  # a service whose stubs are not imported: its series start at its first call
                continue
            for method in methods:
                metrics.init_rpc(method.name)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service, _, rpc = details.method.lstrip("/").rpartition("/")
        if handler is None or service not in self.services:
            return handler  # health, reflection: not ours to count
        if details.method not in self._wrapped:
            self._wrapped[details.method] = self._wrap(handler, rpc)
        return self._wrapped[details.method]

    def _wrap(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        received, sent = self.metrics.received_bytes.labels(rpc), self.metrics.sent_bytes.labels(rpc)
        inner_deserialize, inner_serialize = handler.request_deserializer, handler.response_serializer

        def deserialize(data: bytes):  # sees the exact wire bytes, whatever the codec
            received.inc(len(data))
            return inner_deserialize(data) if inner_deserialize else data

        def serialize(message) -> bytes:
            data = inner_serialize(message) if inner_serialize else message
            sent.inc(len(data))
            return data

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                with self._observe(rpc, request, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream
            if inspect.isasyncgenfunction(inner_stream):
                async def stream(request, context):
                    with self._observe(rpc, request, context):
                        async for reply in inner_stream(request, context):
                            yield reply
            else:  # a coroutine that writes with context.write
                async def stream(request, context):
                    with self._observe(rpc, request, context):
                        return await inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(stream, deserialize, serialize)
        return handler  # client-streaming RPCs: none in moe.v1

    @contextlib.contextmanager
    def _observe(self, rpc: str, request, context) -> Iterator[None]:
        request_id = getattr(request, "request_id", "") or (request_ids.new() if self.make_request_ids else "")
        token = request_ids.bind(request_id)
        m = self.metrics
        in_flight = m.child(m.in_flight, rpc)
        in_flight.inc()
        start = time.perf_counter()
        code = "UNKNOWN"
        try:
            yield
            code = _code_name(context) or "OK"
        except grpc.aio.AbortError:
            code = _code_name(context) or "UNKNOWN"
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away
            code = "CANCELLED"
            raise
        finally:
            seconds = time.perf_counter() - start
            in_flight.dec()
            m.child(m.requests, rpc, code).inc()
            m.child(m.request_seconds, rpc).observe(seconds)
            log.log(self.access_log_level, "%s %s in %.1f ms", rpc, code, seconds * 1e3)
            with contextlib.suppress(ValueError):  # a stream closed from another task has another context
                request_ids.unbind(token)


def _code_name(context) -> str | None:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else None


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    """--metrics-port / --metrics-host, the same on every service."""
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "0")),
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 = off (env MOE_METRICS_PORT; "
                        "default 0)")
    p.add_argument("--metrics-host", default=env("METRICS_HOST", "0.0.0.0"),
                   help="address the metrics endpoint binds (env MOE_METRICS_HOST; default 0.0.0.0)")
