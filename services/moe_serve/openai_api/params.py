"""OpenAI request bodies -> what to ask the gateway for, checked field by field: a bad value is a 400 naming it.

Supported: model, prompt (text, token ids, or a list of either) / messages, max_tokens (chat also
max_completion_tokens), temperature, top_p, n, seed, stop, stream, stream_options.include_usage,
logprobs (completions: 0-5 alternatives; chat: true with top_logprobs 0-20), user; and vLLM's
extensions top_k, ignore_eos and return_tokens_as_token_ids. Parameters the engine cannot honour
(penalties, logit_bias, echo, best_of, suffix, tools, a JSON response_format) are refused by name
unless they are at their no-op value, and an unknown parameter is refused as OpenAI refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moe_serve.model.chat_template import ChatTemplate, ChatTemplateError
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.openai_api.errors import bad_request

MAX_CHOICES = 64  # prompts x n per request
MAX_STOPS = 4  # as OpenAI
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "user",
          "top_k", "ignore_eos", "return_tokens_as_token_ids", "frequency_penalty", "presence_penalty",
          "logit_bias", "logprobs"}
COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
             "function_call", "parallel_tool_calls", "response_format", "metadata", "store", "service_tier"}
# name -> the values at which an unsupported parameter changes nothing
NO_OPS = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "echo": (False,),
          "best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
          "function_call": ("none",), "response_format": ({"type": "text"},)}


@dataclass(frozen=True)
class ModelLimits:
    """What the front end checks requests against: the served name and the checkpoint's sizes."""

    name: str
    vocab_size: int
    context: int  # max_position_embeddings
    default_chat_max_tokens: int = 1024  # chat without max_tokens: up to the context, at most this


@dataclass(frozen=True)
class Generation:
    """A checked request: every prompt's ids and how to generate n choices after each."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    logprobs: int | None  # None: none; k: the chosen token's and k alternatives
    stream: bool
    include_usage: bool
    tokens_as_ids: bool  # logprobs name tokens "token_id:123" (vLLM's return_tokens_as_token_ids)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(name, f"{name}: {value!r} is not a number")
    if value > high or value < low or (low_open and value == low):
        raise bad_request(name, f"{name}: {value} is out of range {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"{name}: {value!r} is not an integer")
    if value < low or (high is not None and value > high):
        raise bad_request(name, f"{name}: {value} must be " + (f"in [{low}, {high}]" if high is not None
                                                                else f"at least {low}"))
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(name, f"{name}: {value!r} is not true or false")
    return value


def _check_names(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad_request("body", "body: the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(unknown[0], f"{unknown[0]}: unrecognized request argument")
    for name, fine in NO_OPS.items():
        if body.get(name) is not None and body[name] not in fine:
            raise bad_request(name, f"{name}: {body[name]!r} is not supported by this server (only {fine[0]!r})")


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop", f"stop: {stop!r} must be a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise bad_request("stop", f"stop: {len(stops)} sequences, at most {MAX_STOPS}")
    return tuple(stops)


def _common(body: dict, limits: ModelLimits, prompts: list[list[int]], max_tokens: int | None,
            prompt_param: str, logprobs: int | None) -> Generation:
    if body.get("model") != limits.name:
        raise bad_request("model", f"model: {body.get('model')!r} does not exist; this server serves "
                                   f"{limits.name!r} (GET /v1/models)", code="model_not_found")
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    if n * len(prompts) > MAX_CHOICES:
        raise bad_request("n", f"n: {n} choices x {len(prompts)} prompts exceed {MAX_CHOICES}")
    longest = max(len(p) for p in prompts)
    if max_tokens is None:  # chat: what the context leaves, up to the server's default
        max_tokens = max(1, min(limits.context - longest, limits.default_chat_max_tokens))
    if longest + max_tokens > limits.context:
        raise bad_request(prompt_param, f"{prompt_param}: this model's maximum context length is {limits.context} "
                          f"tokens; you asked for {longest + max_tokens} ({longest} in the {prompt_param}, "
                          f"{max_tokens} in the completion)", code="context_length_exceeded")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("stream_options", "stream_options: only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad_request("stream_options", f"stream_options: {options!r} takes only include_usage")
    top_k = _integer(body, "top_k", 0, -1)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    return Generation(
        prompts=prompts, n=n, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=max(top_k, 0), seed=seed,
        stop=_stops(body), ignore_eos=_flag(body, "ignore_eos"), logprobs=logprobs, stream=stream,
        include_usage=bool(options and _flag(options, "include_usage")),
        tokens_as_ids=_flag(body, "return_tokens_as_token_ids"),
    )


def _token_prompt(ids: list, limits: ModelLimits, where: str) -> list[int]:
    if not ids:
        raise bad_request("prompt", f"{where}: empty")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.vocab_size:
            raise bad_request("prompt", f"{where}[{i}]: {t!r} is not a token id below the vocab size "
                                        f"{limits.vocab_size}")
    return ids


def _text_prompt(text: str, tokenizer: TextTokenizer | None, where: str) -> list[int]:
    if tokenizer is None:
        raise bad_request("prompt", f"{where}: this checkpoint has no tokenizer.json; send token ids")
    ids = tokenizer.encode(text)
    if not ids:
        raise bad_request("prompt", f"{where}: {text[:40]!r} encodes to no tokens")
    return ids


def parse_completion(body: Any, tokenizer: TextTokenizer | None, limits: ModelLimits) -> Generation:
    """POST /v1/completions."""
    _check_names(body, COMMON | COMPLETION_ONLY)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [_text_prompt(prompt, tokenizer, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        prompts = [_token_prompt(prompt, limits, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = [_text_prompt(p, tokenizer, f"prompt[{i}]") if isinstance(p, str)
                   else _token_prompt(p, limits, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        raise bad_request("prompt", f"prompt: {str(prompt)[:40]!r} must be a non-empty string, a list of token ids, "
                                    "or a list of either")
    logprobs = _integer(body, "logprobs", None, 0, 5)
    return _common(body, limits, prompts, _integer(body, "max_tokens", 16, 1), "prompt", logprobs)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", f"messages: {str(messages)[:40]!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request("messages", f"messages[{i}]: must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: the text parts, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request("messages", f"messages[{i}].content: {content!r} must be a string or text parts")
        out.append({**m, "content": content})
    return out


def parse_chat(body: Any, tokenizer: TextTokenizer | None, template: ChatTemplate | None,
               limits: ModelLimits) -> Generation:
    """POST /v1/chat/completions: the messages through the checkpoint's chat template, as transformers renders it."""
    _check_names(body, COMMON | CHAT_ONLY)
    messages = _messages(body)
    if tokenizer is None or template is None:
        raise bad_request("messages", "messages: this checkpoint has no tokenizer.json with a chat template; "
                                      "use /v1/completions")
    try:
        text = template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as err:
        raise bad_request("messages", f"messages: the chat template refused them: {err}") from err
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("messages", "messages: the chat template renders them to no tokens")
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, 20)
    if top is not None and not logprobs:
        raise bad_request("top_logprobs", "top_logprobs: needs logprobs set to true")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1)
    return _common(body, limits, [ids], max_tokens, "messages", (top or 0) if logprobs else None)
