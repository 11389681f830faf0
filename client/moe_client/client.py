"""Blocking Python API for the gateway (Forward, model info, health) and for expert servers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_client import wire, zerocopy
from moe_client.channel import open_channel, unary_callable
from moe_client.pb import experts_pb2, experts_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from moe_client.security import TLSFiles


class _Client:
    def __init__(self, address: str, timeout: float = 60.0, tls: TLSFiles | None = None, token: str | None = None):
        self.address = address
        self.timeout = timeout
        self._channel = open_channel(address, tls, token)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name for `service` ('' = the whole server), e.g. 'SERVING'."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until health says SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Exception | str = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self.health(service, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                if status == "SERVING":
                    return
                last = status
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.1)
        raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last: {last})")

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class GeneratedToken:
    """One token of a Generate stream; `finish_reason` ('length' or 'stop') is set on the last one only."""

    token_id: int
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    total_seconds: float
    expert_seconds: float
    logprob: float | None = None  # with logprobs=True: log-probability of this token
    top_logprobs: tuple[tuple[int, float], ...] = ()  # with top_logprobs=k: (token id, log-prob), most likely first

    @classmethod
    def from_pb(cls, msg: gateway_pb2.GenerateResponse) -> GeneratedToken:
        """From the wire message."""
        reason = None
        if msg.finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED:
            reason = gateway_pb2.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
        return cls(msg.token_id, msg.text if msg.HasField("text") else None, reason, msg.prompt_tokens,
                   msg.generated_tokens, msg.total_seconds, msg.expert_seconds,
                   msg.logprob if msg.HasField("logprob") else None,
                   tuple((t.token_id, t.logprob) for t in msg.top_logprobs))


class GatewayClient(_Client):
    """Calls a gateway's GatewayService; `tls` and `token` when the gateway asks for them."""

    def __init__(self, address: str, timeout: float = 60.0, tls: TLSFiles | None = None, token: str | None = None):
        super().__init__(address, timeout, tls, token)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._forward = unary_callable(self._channel, "/moe.v1.GatewayService/Forward", zerocopy.ForwardResponse)

    def model_info(self) -> gateway_pb2.GetModelInfoResponse:
        """What the gateway serves, and the expert servers behind it."""
        return self._stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=self.timeout)

    def forward_raw(self, hidden: np.ndarray, wire_dtype: str = "float32", request_id: str | None = None,
                    output_dtype: str | None = None):
        """Forward, returning the reply (`.hidden` a WireTensor, plus the gateway's timings)."""
        request = zerocopy.ForwardRequest(  # the array's bytes are copied once, into the message
            hidden=wire.encode_view(hidden, wire_dtype), request_id=request_id or uuid.uuid4().hex[:16],
            output_dtype=wire.dtype_from_name(output_dtype) if output_dtype else 0,
        )
        return self._forward(request, timeout=self.timeout)

    def forward(self, hidden: np.ndarray, wire_dtype: str = "float32") -> np.ndarray:
        """Hidden states [..., H] through the model's MoE stack; returns float32 of the same shape."""
        return wire.decode(self.forward_raw(hidden, wire_dtype).hidden, "hidden").astype(np.float32, copy=False)


    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 timeout: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
                 request_id: str | None = None) -> Iterator[GeneratedToken]:
        """Stream the tokens generated after `prompt` (text needs a checkpoint with tokenizer.json).

        temperature 0 is greedy; `timeout` bounds the whole stream (default: the client's timeout);
        `logprobs` adds each token's log-probability, `top_logprobs` that many alternatives per step.
        Breaking out of the loop cancels the generation on the gateway.
        """
        request = gateway_pb2.GenerateRequest(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
            request_id=request_id or uuid.uuid4().hex[:16], logprobs=logprobs, top_logprobs=top_logprobs,
        )
        if isinstance(prompt, str):
            request.prompt_text = prompt
        else:
            request.prompt_token_ids.extend(int(t) for t in prompt)
        if seed is not None:
            request.seed = seed
        stream = self._stub.Generate(request, timeout=timeout or self.timeout)
        try:
            for msg in stream:
                yield GeneratedToken.from_pb(msg)
        finally:
            stream.cancel()  # a no-op once the stream has ended


class ExpertClient(_Client):
    """Calls an expert server's ExpertService directly (tests, benchmarks, debugging)."""

    def __init__(self, address: str, timeout: float = 60.0, tls: TLSFiles | None = None):
        super().__init__(address, timeout, tls)
        self._stub = experts_pb2_grpc.ExpertServiceStub(self._channel)
        self._run = unary_callable(self._channel, "/moe.v1.ExpertService/RunExperts", zerocopy.RunExpertsResponse)

    def info(self) -> experts_pb2.GetInfoResponse:
        """The server's checkpoint fingerprint, owned experts and devices."""
        return self._stub.GetInfo(experts_pb2.GetInfoRequest(), timeout=self.timeout)

    def run_experts(self, layer: int, hidden: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray,
                    wire_dtype: str = "float32") -> np.ndarray:
        """Weighted sum of this server's experts per token: [T, H] float32."""
        request = zerocopy.RunExpertsRequest(
            layer=layer,
            hidden=wire.encode_view(hidden, wire_dtype),
            expert_ids=wire.encode_view(np.asarray(expert_ids, dtype=np.int32)),
            weights=wire.encode_view(np.asarray(weights, dtype=np.float32)),
        )
        reply = self._run(request, timeout=self.timeout)
        return wire.decode(reply.output, "output").astype(np.float32, copy=False)
