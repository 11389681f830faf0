"""GatewayService: decode, run the engine off the event loop, encode."""

from __future__ import annotations

import torch

from moe_client import wire, zerocopy
from moe_client.pb import gateway_pb2, gateway_pb2_grpc
from moe_serve.gateway.engine import ForwardStats, GatewayEngine
from moe_serve.gateway.forward_batcher import ForwardBatcher
from moe_serve.gateway.generate_request import FINISH_REASONS, prompt_ids, require_causal, sampling_params
from moe_serve.gateway.scheduler import GenerateScheduler
from moe_serve.gateway.streaming import iterate_in_thread
from moe_serve.observability.metrics import ServiceMetrics
from moe_serve.observability.serving import ServingMetrics
from moe_serve.process.handoff import ContextThreadPool
from moe_serve.rpc.codec import from_wire, to_wire
from moe_serve.rpc.errors import InvalidArgument, ResourceExhausted
from moe_serve.rpc.finite import all_finite
from moe_serve.rpc.message_limits import check_reply
from moe_serve.rpc.registration import add_servicer
from moe_serve.rpc.server import rpc, rpc_stream

_FLOAT = (wire.FLOAT32, wire.BFLOAT16, wire.FLOAT16, wire.FLOAT8_E4M3)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves Forward, Generate and GetModelInfo for one engine."""

    max_reply_bytes: int | None = None  # the server's message limit: larger replies are refused before compute

    def __init__(self, engine: GatewayEngine, info: gateway_pb2.GetModelInfoResponse, max_tokens: int = 65536,
                 workers: int = 4, max_new_tokens: int = 4096, metrics: ServiceMetrics | None = None,
                 batcher: ForwardBatcher | None = None, scheduler: GenerateScheduler | None = None):
        self.engine = engine
        self.batcher = batcher  # None: each Forward runs alone on a worker thread
        self.scheduler = scheduler  # None: each Generate holds a worker thread for its whole stream
        self.info = info
        self.metrics = metrics or ServiceMetrics("gateway")
        self.max_tokens = max_tokens
        self.max_new_tokens = max_new_tokens
        # ContextThreadPool: the engine's thread sees the request's deadline (moe_serve.process.handoff)
        self.executor = ContextThreadPool(max_workers=workers, thread_name_prefix="gateway")
        self.serving = ServingMetrics(self.metrics.registry)
        self._alone: dict[int, int] = {}  # without a scheduler: tokens (prompt + generated) of each open stream
        self.serving.watch(self.load)

    def load(self) -> tuple[int, int, int]:
        """(running, waiting, KV-cache tokens) of Generate, for the gauges."""
        if self.scheduler is not None:
            return self.scheduler.active, self.scheduler.waiting, self.scheduler.kv_tokens
        return len(self._alone), 0, sum(self._alone.values())

    def decode_hidden(self, msg) -> torch.Tensor:
        """Validated [..., H] hidden states ([S, H] or [B, S, H] for a causal LM); names the bad value."""
        hidden = from_wire(msg, "hidden", _FLOAT)
        h = self.engine.hidden_size
        if hidden.dim() < 1 or hidden.shape[-1] != h:
            raise InvalidArgument(f"hidden: shape {list(hidden.shape)} must end in the hidden size {h}")
        if self.engine.is_causal:
            if hidden.dim() not in (2, 3):
                raise InvalidArgument(f"hidden: shape {list(hidden.shape)} must be [S, {h}] or [B, S, {h}] "
                                      "for a causal LM")
            limit = self.engine.model.spec.max_position_embeddings
            if hidden.shape[-2] > limit:
                raise InvalidArgument(f"hidden: sequence length {hidden.shape[-2]} exceeds the model's "
                                      f"max_position_embeddings {limit}")
        tokens = hidden.numel() // h
        if tokens == 0:
            raise InvalidArgument(f"hidden: empty batch (shape {list(hidden.shape)})")
        if tokens > self.max_tokens:
            raise ResourceExhausted(f"hidden: {tokens} tokens exceed the gateway's limit of {self.max_tokens}")
        if not all_finite(hidden):
            raise InvalidArgument("hidden: contains NaN or Inf")
        return hidden

    @rpc
    async def Forward(self, request, context):
        hidden = self.decode_hidden(request.hidden)
        out_dtype = request.output_dtype or request.hidden.dtype
        if out_dtype not in _FLOAT:
            raise InvalidArgument(f"output_dtype: {wire.dtype_name(out_dtype)} is not a float wire dtype")
        check_reply("Forward", hidden.numel() * wire.STORAGE[out_dtype].itemsize, self.max_reply_bytes)
        if self.batcher is not None:
            out, stats = await self.batcher.forward(hidden)
        else:
            out, stats = await self.metrics.run_queued(self.executor, self.engine.forward, hidden)
        self.metrics.observe_batch("Forward", hidden.numel() // self.engine.hidden_size)
        return zerocopy.ForwardResponse(
            hidden=to_wire(out, out_dtype), total_seconds=stats.total_seconds, expert_seconds=stats.expert_seconds
        )

    @rpc_stream
    async def Generate(self, request, context):
        require_causal(self.engine.is_causal, self.info.model_type)
        spec = self.engine.model.spec
        ids = prompt_ids(request, spec, self.engine.tokenizer)
        params = sampling_params(request, spec, len(ids), self.max_new_tokens, self.max_tokens)
        self.metrics.observe_batch("Generate", len(ids))
        stats = ForwardStats()
        timer = self.serving.request(len(ids))
        tokens = (self.scheduler.stream(ids, params, stats) if self.scheduler is not None
                  else iterate_in_thread(self.executor, lambda: self.engine.generate(ids, params, stats)))
        self._alone[id(stats)] = len(ids)
        try:
            async for reply in self._replies(tokens, ids, stats, timer):
                yield reply
        finally:
            self._alone.pop(id(stats), None)

    async def _replies(self, tokens, ids: list[int], stats: ForwardStats, timer):
        """Each token as a GenerateResponse, timed for the serving metrics."""
        count = 0
        async for token in tokens:
            count += 1
            self._alone[id(stats)] = len(ids) + count
            timer.token(stats.admitted)
            if token.finish_reason is not None:
                timer.finish(token.finish_reason.value)
            self.metrics.observe_tokens("Generate")
            reply = gateway_pb2.GenerateResponse(
                token_id=token.token_id, text=token.text, finish_reason=FINISH_REASONS[token.finish_reason],
                prompt_tokens=len(ids), generated_tokens=count, total_seconds=stats.total_seconds,
                expert_seconds=stats.expert_seconds,
            )
            if token.logprobs is not None:
                reply.logprob = token.logprobs.logprob
                reply.top_logprobs.extend(gateway_pb2.TokenLogprob(token_id=t, logprob=lp)
                                          for t, lp in token.logprobs.top)
            yield reply

    @rpc
    async def GetModelInfo(self, request, context):
        return self.info


def add_to_server(servicer: GatewayServicer, server) -> None:
    """Register the servicer; Forward reads and writes its tensors without copying them (zerocopy)."""
    add_servicer(server, gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"], servicer)
