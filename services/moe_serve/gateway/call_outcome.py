"""What a failed RunExperts call means for the dispatcher, whichever way it went (gRPC or same-host)."""

from __future__ import annotations

import grpc

Failures = dict[str, tuple[grpc.StatusCode, str]]  # address -> why its call failed, in this layer call
# A replica answering these is not to blame (the request is bad): trying another would fail the same way.
FINAL = (grpc.StatusCode.INVALID_ARGUMENT,)
# These leave the replica in the pool: it is busy, not broken.
NO_EJECT = (grpc.StatusCode.RESOURCE_EXHAUSTED,)


def tried(failures: Failures) -> str:
    """' (tried: ...)' naming every failed call, for an error message; '' when none failed."""
    return f" (tried: {'; '.join(text for _, text in failures.values())})" if failures else ""
