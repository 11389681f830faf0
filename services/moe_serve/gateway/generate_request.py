"""Check a GenerateRequest against the model and the gateway's limits; every error names the bad value."""

from __future__ import annotations

import math

from moe_client.pb import gateway_pb2
from moe_serve.core.generation import FinishReason, SamplingParams
from moe_serve.core.logprobs import MAX_TOP_LOGPROBS
from moe_serve.core.spec import ModelSpec
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.rpc.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

DEFAULT_MAX_NEW_TOKENS = 16
FINISH_REASONS = {None: gateway_pb2.FINISH_REASON_UNSPECIFIED, FinishReason.LENGTH: gateway_pb2.FINISH_REASON_LENGTH,
                  FinishReason.STOP: gateway_pb2.FINISH_REASON_STOP}


def _ids_in_vocab(ids: list[int], field: str, vocab: int) -> None:
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab]
    if bad:
        i, t = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InvalidArgument(f"{field}[{i}]: token id {t} out of range for vocab size {vocab}{more}")


def prompt_ids(request: gateway_pb2.GenerateRequest, spec: ModelSpec, tokenizer: TextTokenizer | None) -> list[int]:
    """The prompt as token ids, from prompt_token_ids or (with a tokenizer) prompt_text."""
    if request.prompt_token_ids and request.prompt_text:
        raise InvalidArgument("prompt: give prompt_token_ids or prompt_text, not both")
    if request.prompt_text:
        if tokenizer is None:
            raise InvalidArgument("prompt_text: this checkpoint has no tokenizer.json; send prompt_token_ids")
        ids = tokenizer.encode(request.prompt_text)
        if not ids:
            raise InvalidArgument(f"prompt_text: {request.prompt_text[:40]!r} encodes to no tokens")
        return ids
    ids = list(request.prompt_token_ids)
    if not ids:
        raise InvalidArgument("prompt: empty (give prompt_token_ids or prompt_text)")
    _ids_in_vocab(ids, "prompt_token_ids", spec.vocab_size)
    return ids


def sampling_params(request: gateway_pb2.GenerateRequest, spec: ModelSpec, prompt_len: int,
                    max_new_tokens_limit: int, max_prompt_tokens: int) -> SamplingParams:
    """Decoding settings, checked against the model's context length and the gateway's limits."""
    if prompt_len > max_prompt_tokens:
        raise ResourceExhausted(f"prompt: {prompt_len} tokens exceed the gateway's limit of {max_prompt_tokens}")
    max_new = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new > max_new_tokens_limit:
        raise InvalidArgument(f"max_new_tokens: {max_new} exceeds the gateway's limit of {max_new_tokens_limit}")
    if prompt_len + max_new > spec.max_position_embeddings:
        raise InvalidArgument(f"max_new_tokens: prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) = "
                              f"{prompt_len + max_new} exceeds the model's max_position_embeddings "
                              f"{spec.max_position_embeddings}")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise InvalidArgument(f"temperature: {request.temperature} must be a finite number >= 0 (0 = greedy)")
    if not math.isfinite(request.top_p) or not 0 <= request.top_p <= 1:
        raise InvalidArgument(f"top_p: {request.top_p} must be a number in [0, 1]")
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs: {request.top_logprobs} exceeds the limit of {MAX_TOP_LOGPROBS}")
    stops = list(request.stop_token_ids)
    _ids_in_vocab(stops, "stop_token_ids", spec.vocab_size)
    if not request.ignore_eos:
        stops += spec.eos_token_ids
    return SamplingParams(
        max_new_tokens=max_new, temperature=float(request.temperature), top_k=int(request.top_k),
        top_p=float(request.top_p) if 0 < request.top_p < 1 else 1.0,
        seed=int(request.seed) if request.HasField("seed") else None, stop_token_ids=frozenset(stops),
        logprobs=int(request.top_logprobs) if request.logprobs or request.top_logprobs else None,
    )


def require_causal(is_causal: bool, model_type: str) -> None:
    """Generate needs embeddings and an lm_head: FAILED_PRECONDITION for simple_moe."""
    if not is_causal:
        raise FailedPrecondition(f"Generate: model {model_type} has no embeddings or lm_head (use Forward); "
                                 "serve a causal LM checkpoint to generate")
