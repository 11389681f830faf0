"""The OpenAI-compatible HTTP API (Starlette): each request becomes gRPC Generate streams to the gateway.

    POST /v1/completions, POST /v1/chat/completions   whole JSON, or server-sent events ending in `data: [DONE]`
    GET /v1/models, GET /health

The caller's `Authorization: Bearer ...` header goes to the gateway as gRPC metadata, so the gateway's
--auth-token decides (401 when it is missing or wrong). Errors are OpenAI's JSON with the status a
client expects: 400 a bad parameter (named), 401, 429 the gateway's queue is full, 503 the gateway or
its experts are down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_client.channel import open_aio_channel
from moe_client.pb import gateway_pb2, gateway_pb2_grpc
from moe_client.security import AUTH_METADATA, TLSFiles
from moe_serve.model.chat_template import ChatTemplate
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.openai_api.choices import Step, merge, run_choice
from moe_serve.openai_api.errors import APIError, bad_request, from_grpc
from moe_serve.openai_api.params import Generation, ModelLimits, parse_chat, parse_completion
from moe_serve.openai_api.responses import ResponseWriter, TokenNames, sse

log = logging.getLogger(__name__)
DONE = sse("[DONE]")


class FrontEnd:
    """The routes' state: the gateway channel, the tokenizer and chat template, the served model's limits."""

    def __init__(self, gateway: str, limits: ModelLimits, tokenizer: TextTokenizer | None,
                 template: ChatTemplate | None, tls: TLSFiles | None = None, timeout: float = 600.0):
        self.gateway, self.limits, self.tokenizer, self.template = gateway, limits, tokenizer, template
        self.tls, self.timeout = tls, timeout
        self.created = int(time.time())
        self.channel: grpc.aio.Channel | None = None

    def app(self) -> Starlette:
        """The ASGI application."""
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={APIError: _api_error, 404: _not_found},
                         lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.channel = open_aio_channel(self.gateway, self.tls)  # on uvicorn's event loop
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            yield
        finally:
            await self.channel.close()

    async def completions(self, request: Request) -> Response:
        gen = parse_completion(await _json(request), self.tokenizer, self.limits)
        return await self._respond(request, gen, "completion", f"cmpl-{uuid.uuid4().hex}")

    async def chat(self, request: Request) -> Response:
        gen = parse_chat(await _json(request), self.tokenizer, self.template, self.limits)
        return await self._respond(request, gen, "chat", f"chatcmpl-{uuid.uuid4().hex}")

    async def models(self, request: Request) -> Response:
        try:  # asks the gateway, so a token it refuses is a 401 here too
            await self.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), metadata=_auth(request), timeout=10)
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from err
        return JSONResponse({"object": "list", "data": [{
            "id": self.limits.name, "object": "model", "created": self.created, "owned_by": "moe-serve",
            "max_model_len": self.limits.context}]})

    async def health(self, request: Request) -> Response:
        """200 when the gateway answers SERVING (every expert served), else 503."""
        try:
            reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as err:
            status = f"{err.code().name}: {err.details()}"
        if status != "SERVING":
            raise APIError(503, f"gateway {self.gateway}: {status}")
        return JSONResponse({"status": "ok"})

    def _streams(self, request: Request, gen: Generation, request_id: str) -> AsyncIterator[Step]:
        metadata = _auth(request)
        streams = []
        for p, prompt in enumerate(gen.prompts):
            for j in range(gen.n):
                choice = p * gen.n + j
                msg = gateway_pb2.GenerateRequest(
                    prompt_token_ids=prompt, max_new_tokens=gen.max_tokens, temperature=gen.temperature,
                    top_k=gen.top_k, top_p=gen.top_p, ignore_eos=gen.ignore_eos,
                    request_id=request_id if len(gen.prompts) * gen.n == 1 else f"{request_id}-{choice}",
                    logprobs=gen.logprobs is not None, top_logprobs=gen.logprobs or 0)
                if gen.seed is not None:  # choice j of a prompt draws with seed + j: n different samples
                    msg.seed = gen.seed + j
                streams.append(run_choice(self.stub, msg, choice, gen.stop, metadata, self.timeout))
        return merge(streams)

    async def _respond(self, request: Request, gen: Generation, kind: str, request_id: str) -> Response:
        writer = ResponseWriter(kind, request_id, self.limits.name, gen, TokenNames(self.tokenizer, gen.tokens_as_ids))
        steps = self._streams(request, gen, request_id)
        try:
            if not gen.stream:
                async for step in steps:
                    writer.add(step)
                return JSONResponse(writer.whole())
            first = await anext(steps)  # before the headers: an error up to the first token keeps its status
        except grpc.aio.AioRpcError as err:
            await steps.aclose()
            raise from_grpc(err) from err
        except StopAsyncIteration as err:
            raise APIError(502, "gateway: the stream ended before its first token") from err
        return StreamingResponse(self._events(writer, first, steps), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    async def _events(self, writer: ResponseWriter, first: Step, steps: AsyncIterator[Step]) -> AsyncIterator[bytes]:
        try:
            for chunk in writer.opening():
                yield chunk
            if (chunk := writer.chunk(first)) is not None:
                yield chunk
            async for step in steps:
                if (chunk := writer.chunk(step)) is not None:
                    yield chunk
            if writer.gen.include_usage:
                yield writer.usage_chunk()
        except grpc.aio.AioRpcError as err:  # after the headers: the error as the stream's last event
            yield sse(from_grpc(err).body())
        finally:
            await steps.aclose()  # the client went away (or a stop string matched): the gateway drops the rest
        yield DONE


def _auth(request: Request) -> list[tuple[str, str]] | None:
    value = request.headers.get("authorization")
    return [(AUTH_METADATA, value)] if value else None


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except ValueError as err:
        raise bad_request("body", f"body: not valid JSON ({err})") from err


async def _api_error(request: Request, err: APIError) -> Response:
    if err.status >= 500:
        log.warning("%s %s: %d %s", request.method, request.url.path, err.status, err.message)
    return JSONResponse(err.body(), status_code=err.status)


async def _not_found(request: Request, err) -> Response:
    return JSONResponse(APIError(404, f"{request.method} {request.url.path}: no such route").body(), status_code=404)
