"""The JSON OpenAI clients read: completions and chat completions, whole or as stream chunks, with log-probs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.openai_api.choices import Step
from moe_serve.openai_api.params import Generation


def sse(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class TokenNames:
    """A token's text for log-probs: its own decoded text (special tokens kept), or "token_id:N" on request."""

    def __init__(self, tokenizer: TextTokenizer | None, as_ids: bool):
        self.tokenizer = None if as_ids else tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        name = self.cache.get(token_id)
        if name is None:
            name = (f"token_id:{token_id}" if self.tokenizer is None
                    else self.tokenizer.tokenizer.decode([token_id], skip_special_tokens=False))
            self.cache[token_id] = name
        return name


def chat_logprobs(steps: list[Step], names: TokenNames) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]} of chat completions."""
    def entry(token_id: int, logprob: float) -> dict:
        name = names(token_id)
        return {"token": name, "logprob": logprob, "bytes": list(name.encode())}

    return {"content": [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in steps], "refusal": None}


def completion_logprobs(steps: list[Step], names: TokenNames, offset: int) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} of (legacy) completions; `offset`: where
    the first step's text starts in the choice's text."""
    offsets = []
    for s in steps:
        offsets.append(offset)
        offset += len(s.text)
    return {"tokens": [names(s.token_id) for s in steps], "token_logprobs": [s.logprob for s in steps],
            "top_logprobs": [{names(t): lp for t, lp in s.top} for s in steps], "text_offset": offsets}


@dataclass
class Choice:
    """One choice being put together."""

    text: str = ""
    steps: list[Step] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class ResponseWriter:
    """Turns Steps into the response (whole, or chunk by chunk) of one request."""

    def __init__(self, kind: str, request_id: str, model: str, gen: Generation, names: TokenNames):
        self.chat = kind == "chat"
        self.id, self.model, self.gen, self.names = request_id, model, gen, names
        self.created = int(time.time())
        self.choices = [Choice() for _ in range(len(gen.prompts) * gen.n)]
        self.prompt_tokens = [0] * len(gen.prompts)

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens)  # once per prompt, whatever n (as OpenAI counts)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def add(self, step: Step) -> None:
        """Record a step (whole responses and usage)."""
        choice = self.choices[step.choice]
        choice.text += step.text
        choice.completion_tokens = step.completion_tokens
        choice.finish_reason = step.finish_reason or choice.finish_reason
        self.prompt_tokens[step.choice // self.gen.n] = step.prompt_tokens
        if self.gen.logprobs is not None:
            choice.steps.append(step)

    def whole(self) -> dict:
        """The non-streamed response."""
        out = []
        for i, c in enumerate(self.choices):
            logprobs = None
            if self.gen.logprobs is not None:
                logprobs = chat_logprobs(c.steps, self.names) if self.chat else completion_logprobs(c.steps,
                                                                                                    self.names, 0)
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self._head(False), "choices": out, "usage": self.usage()}

    def opening(self) -> list[bytes]:
        """Chat streams start each choice with the assistant's role."""
        if not self.chat:
            return []
        return [sse({**self._head(True), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                for i in range(len(self.choices))]

    def chunk(self, step: Step) -> bytes | None:
        """The stream chunk of one step (None when it has nothing to say: text held back for a stop string)."""
        offset = len(self.choices[step.choice].text)
        self.add(step)
        has_logprobs = self.gen.logprobs is not None
        if not step.text and step.finish_reason is None and not has_logprobs:
            return None
        logprobs = None
        if has_logprobs:
            logprobs = chat_logprobs([step], self.names) if self.chat else completion_logprobs([step], self.names,
                                                                                               offset)
        if self.chat:
            delta = {"content": step.text} if step.text or step.finish_reason is None else {}
            choice = {"index": step.choice, "delta": delta, "logprobs": logprobs, "finish_reason": step.finish_reason}
        else:
            choice = {"index": step.choice, "text": step.text, "logprobs": logprobs,
                      "finish_reason": step.finish_reason}
        return sse({**self._head(True), "choices": [choice]})

    def usage_chunk(self) -> bytes:
        """The last chunk with stream_options.include_usage: no choices, the whole request's usage."""
        return sse({**self._head(True), "choices": [], "usage": self.usage()})
