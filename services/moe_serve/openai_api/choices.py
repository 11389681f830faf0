"""Each choice of a request is one gRPC Generate stream; its messages become Steps, stop strings end it.

Several choices (n > 1, or several prompts) run as concurrent streams merged into one sequence of
Steps. Leaving the iteration (the HTTP client went away, or a stop string matched) cancels the
streams at once, and the gateway frees their sequences at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from moe_client.pb import gateway_pb2

_FINISH = {gateway_pb2.FINISH_REASON_LENGTH: "length", gateway_pb2.FINISH_REASON_STOP: "stop"}


class StopText:
    """A choice's text as pieces arrive: ends at the first stop string (which is left out), and holds back
    the last len(longest stop) - 1 characters while a stop string may still be forming across pieces."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters handed out
        self.stopped = False

    def push(self, piece: str, last: bool) -> str:
        """The text that may go out now (with `last`, everything left); nothing once a stop string matched."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)  # a stop ending in `piece` starts here or later
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped, last = self.text[:min(hits)], True, True
        end = len(self.text) if last else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


@dataclass
class Step:
    """What one Generate message adds to choice `choice`."""

    choice: int
    text: str
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def run_choice(stub, request: gateway_pb2.GenerateRequest, choice: int, stops: Sequence[str],
                     metadata, timeout: float) -> AsyncIterator[Step]:
    """The Steps of one Generate stream; a stop string ends it early (finish_reason "stop")."""
    call = stub.Generate(request, metadata=metadata, timeout=timeout)
    text = StopText(stops)
    try:
        async for msg in call:
            finish = _FINISH.get(msg.finish_reason)
            piece = text.push(msg.text, last=finish is not None)
            if text.stopped:
                finish = "stop"
            yield Step(choice, piece, msg.token_id, msg.logprob if msg.HasField("logprob") else None,
                       [(t.token_id, t.logprob) for t in msg.top_logprobs], finish, msg.prompt_tokens,
                       msg.generated_tokens)
            if finish is not None:
                return
    finally:
        call.cancel()  # a no-op once the stream has ended; else the gateway drops the sequence


async def merge(streams: list[AsyncIterator[Step]]) -> AsyncIterator[Step]:
    """Steps of all `streams` as they come; the first error ends everything and is raised here."""
    if len(streams) == 1:
        async for step in streams[0]:
            yield step
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Step]) -> None:
        try:
            async for step in stream:
                queue.put_nowait(step)
        except Exception as err:  # handed to the consumer
            queue.put_nowait(err)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
