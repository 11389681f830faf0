"""Errors in OpenAI's JSON shape, with the HTTP status a client expects, and the gateway's gRPC codes mapped to them.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import grpc

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error", 499: "client_closed_request", 500: "server_error", 503: "service_unavailable",
          504: "timeout_error"}
_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
           grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
           grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
           grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
           grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499}
# The gateway's field names in its INVALID_ARGUMENT messages -> the OpenAI parameter they come from.
_PARAMS = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt", "prompt": "prompt",
           "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "top_logprobs": "top_logprobs",
           "stop_token_ids": "stop"}


class APIError(Exception):
    """An error answered as OpenAI answers it; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The JSON body: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(param: str, message: str, code: str | None = None) -> APIError:
    """400 naming `param`; the message starts with the parameter's name too."""
    return APIError(400, message if message.startswith(param) else f"{param}: {message}", param, code)


def from_grpc(err: grpc.aio.AioRpcError) -> APIError:
    """The gateway's status -> HTTP: 400 bad values, 401 token, 429 queue full, 503 experts or gateway down."""
    status = _STATUS.get(err.code(), 500)
    details = err.details() or err.code().name
    param = _PARAMS.get(details.split(":", 1)[0].split("[", 1)[0]) if status == 400 else None
    return APIError(status, f"gateway: {details}", param, err.code().name.lower())
