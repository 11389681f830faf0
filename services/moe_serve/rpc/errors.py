"""Errors that carry a gRPC status: raised anywhere below a servicer, mapped in one place."""

from __future__ import annotations

import grpc

from moe_client.wire import WireError


class ServiceError(Exception):
    """An error with the status code a caller should see; the message names the offending value."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for a known error type, or None for an unexpected one."""
    if isinstance(err, ServiceError):
        return err.code, err.message
    if isinstance(err, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    return None
