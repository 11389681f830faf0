"""How large a message a service accepts and sends: derived from the model, not a fixed 1 GiB.

The largest message either service needs is a batch of hidden states: at most `max_tokens` tokens
of `hidden_size` values, 4 bytes each in the widest wire dtype (float32), plus, for RunExperts, each
token's expert ids (int64) and gate weights (float32) for its top-k, plus an fp8 scale per token,
plus slack for headers and small fields. Anything larger cannot be a valid request, so grpc refuses
it before it is read in full (RESOURCE_EXHAUSTED); a fixed 1 GiB let a caller make a server hold a
gigabyte per refused request.

A reply is refused before it is computed when its size, known from the request, passes the limit
(`check_reply`): computing it in full and then failing to send it wasted the work and counted as OK.
"""

from __future__ import annotations

from moe_serve.rpc.errors import ResourceExhausted

SLACK_BYTES = 1 << 20  # message headers, ids, names and small fields
REPLY_HEADER_BYTES = 4096  # a reply's fields besides its tensor bytes (dtype, shape, timings) take far less


def message_limit(hidden_size: int, top_k: int, max_tokens: int) -> int:
    """Bytes of the largest valid message: `max_tokens` tokens of float32 hidden states with their routing."""
    per_token = hidden_size * 4 + top_k * (8 + 4) + 4  # hidden fp32, ids int64 + weights fp32, an fp8 scale
    return max_tokens * per_token + SLACK_BYTES


def check_reply(what: str, nbytes: int, limit: int | None) -> None:
    """ResourceExhausted, before any compute, when a reply of `nbytes` would pass the message limit."""
    if limit is not None and nbytes + REPLY_HEADER_BYTES > limit:
        raise ResourceExhausted(f"{what}: the reply would be {nbytes} bytes, over this server's message limit of "
                                f"{limit} bytes (--max-message-bytes); send fewer tokens or a narrower output_dtype")
