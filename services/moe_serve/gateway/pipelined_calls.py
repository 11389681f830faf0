"""Device-routed calls the model thread does not wait for: its GPU stream waits for the server's word instead.

A device-routed call on a GPU (side_dispatch.start_routed) needs no host copy of anything, yet the
model thread still waited for each reply: the reply names the server's event, and a stream can only
wait on an event once it has been recorded. So the host paid a round trip and the server's handling
per MoE layer (~0.9 ms on the H200 host, against 0.47 ms of GPU work). Here the request names a word
in our GPU memory that the server's stream sets once its output is written (rpc/stream_signals.py);
our stream waits for the word, and the model thread goes on to the next layer at once. The server's
host handles call N while ours stages call N + 1 and the GPU computes call N - 1.

The replies are still read, in order, later: when more than `depth` calls of the thread are unread,
and all of them at the model's last MoE layer, so a forward's output never leaves before every call
in it answered OK. A call that failed fails the forward there. Nothing is lost by learning of it a few
layers late, because calls go this way only when each expert of the layer has one serving replica
(pool.sole_plan): a failover would have had nowhere to go, and the layer would have failed anyway.
When experts are replicated (or being moved, which loads them on the new server first), calls wait for
their replies and fail over as before.

Our stream must never wait for a word nobody will set:
- each call has a word of its own (a ring per server and device; the value counts the laps), so a late
  write by a server can only release the wait of the call it answers;
- a failed call's word is set by us, on a stream of our own: by the model thread when it reads the
  error, or by a watchdog thread when the model thread is itself waiting on the GPU (a peer gone, an
  error reply, a call past its time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from moe_client import wire
from moe_client.pb import experts_pb2
from moe_serve.rpc import stream_signals
from moe_serve.rpc.gpu_events import current_stream
from moe_serve.rpc.shared_regions import Arena

log = logging.getLogger(__name__)
WORDS = 1 << 16  # words per (server, device): 256 KiB, far more than the calls a server can be behind
_WATCH_EVERY = 0.02  # s between the watchdog's looks while calls are unread


@dataclass(frozen=True)
class Word:
    """One call's done word: its index in the ring, the value the server sets, and its device address."""

    index: int
    value: int
    address: int

    def fields(self) -> bytes:
        """The request's done_index and done_value, serialised (appended to the cached rest of the request)."""
        return experts_pb2.RunExpertsRequest(done_index=self.index, done_value=self.value).SerializeToString()


class DoneWords:
    """A ring of words in our GPU memory, one per call to one server on one device, mapped by that server."""

    def __init__(self, device: torch.device):
        self.arena = Arena(device, WORDS * 4)
        words = self.arena.view(0, wire.INT32, (WORDS, 1))
        words.zero_()  # queued before any call's staging: the server's first write comes after it
        self.message = self.arena.message(0, wire.INT32, (WORDS, 1))
        self._base = words.data_ptr()
        self._count = 0
        self._lock = threading.Lock()

    def take(self) -> Word:
        with self._lock:
            count = self._count
            self._count += 1
        index = count % WORDS
        return Word(index, count // WORDS + 1, self._base + 4 * index)


class PendingCalls:
    """The dispatcher's device-routed rounds whose replies are unread, per model thread, and their watchdog."""

    def __init__(self, last_layer: int, depth: int = 3, first_layer: int = -1):
        self.last_layer = last_layer  # the model's last MoE layer: every reply is read there
        self.first_layer = first_layer  # its first: a thread's replies still unread there are a stopped forward's
        self.depth = depth
        self._rounds: dict[int, deque] = {}  # thread id -> its rounds, oldest first
        self._words: dict[tuple[str, torch.device], DoneWords] = {}
        self._rescuers: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set when a round joins: the watchdog sleeps while none is unread
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self.rescued = 0  # words we set ourselves (tests read it)
        self.rounds = 0  # rounds not waited for (benchmarks read it)

    def usable(self, replicas, device: torch.device) -> bool:
        """Whether a round to `replicas` (each expert's one owner) for tensors on `device` may go unwaited: on the
        device's default stream only. CUDA does not see an order made through words and warns that it may then queue
        work in an order that deadlocks. On one stream (the micro-batches' threads share it too) every wait is
        queued after its call was sent, and a call's inputs after any wait before them, so a call only ever waits
        on calls sent before it, which each server answers first; and the word ring's zero fill comes before every
        call on it."""
        return (device.type == "cuda" and all(r.done_signals for r in replicas) and stream_signals.available(device)
                and current_stream(device).cuda_stream == 0 and not torch.cuda.is_current_stream_capturing())

    def word(self, address: str, device: torch.device) -> tuple[DoneWords, Word]:
        """The ring for server `address` on `device`, and the next call's word in it."""
        key = (address, device)
        with self._lock:
            words = self._words.get(key)
            if words is None:
                words = self._words[key] = DoneWords(device)
        return words, words.take()

    def wait(self, round_) -> torch.Tensor:
        """[T, H] float32: the round's sum, queued after our stream's waits for its words; the round joins the
        unread ones, and the oldest are read (this one too at the last MoE layer)."""
        stream = current_stream(round_.hidden.device)
        out = None
        for part in round_.parts:  # in the round's order (by first expert), as a waited-for round adds them
            stream_signals.wait_at_least(stream, part.word.address, part.word.value)
            out = part.result.to(torch.float32, copy=True) if out is None else out.add_(part.result)
        self._join(round_)
        return out

    def _join(self, round_) -> None:
        """`round_` joins this thread's unread rounds, and the oldest are read (all at the last MoE layer)."""
        rounds = self._mine()
        if rounds and round_.layer == self.first_layer:
            self._drop()
        with self._lock:
            rounds.append(round_)
            self.rounds += 1
        self._start_watchdog()
        self._wake.set()
        self.settle(0 if round_.layer == self.last_layer else self.depth)

    def settle(self, keep: int = 0) -> None:
        """Read this thread's unread replies, oldest first, until at most `keep` are left; a failed call raises
        its error once all of them are read (the rest of its forward is not used)."""
        rounds = self._mine()
        error: BaseException | None = None
        while True:
            with self._lock:
                if (len(rounds) <= keep and error is None) or not rounds:
                    break
                round_ = rounds[0]
            try:
                round_.settle(self)
            except Exception as err:  # the first is raised once all are read
                error = error or err
            finally:
                with self._lock:
                    rounds.popleft()
        if error is not None:
            raise error

    def _drop(self) -> None:
        """Read the unread rounds of this thread's last forward, which stopped before its last MoE layer (it
        raised, and its caller had that error): their arenas go back to the pool and the servers' counts down;
        what failed among them fails no later forward, and is only logged."""
        try:
            self.settle()
        except Exception as err:
            log.warning("a call of a forward that had already stopped failed: %s", err)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the watchdog (the dispatcher is closing)."""
        self._closed = True
        self._wake.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout)

    def rescue(self, part) -> None:
        """Set `part`'s word ourselves (its server will not): our stream's wait for it ends."""
        with self._lock:
            if part.rescued:
                return
            part.rescued = True
            self.rescued += 1
        self._set(part.result.device, part.word)

    def _set(self, device: torch.device, word: Word) -> None:
        """Write `word` from a stream of ours that waits for nothing."""
        with torch.cuda.device(device):
            stream = self._rescuers.get(device)
            if stream is None:
                stream = self._rescuers[device] = torch.cuda.Stream(device)
            stream_signals.write(stream, word.address, word.value)

    def _mine(self) -> deque:
        key = threading.get_ident()
        with self._lock:
            rounds = self._rounds.get(key)
            if rounds is None:
                rounds = self._rounds[key] = deque()
        return rounds

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            with self._lock:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, name="pipelined-calls", daemon=True)
                    self._watchdog.start()

    def _watch(self) -> None:
        """Every _WATCH_EVERY s: any unread call whose server will not set its word (an error reply, the channel
        closed, or no reply and past its time) gets it set by us, so a model thread waiting on the GPU is never
        stuck."""
        while not self._closed:
            with self._lock:
                parts = [(round_, part) for rounds in self._rounds.values() for round_ in rounds
                         for part in round_.parts if not part.rescued]
            if not parts:  # nothing unread: sleep until a round joins
                self._wake.wait()
                self._wake.clear()
                continue
            time.sleep(_WATCH_EVERY)
            for round_, part in parts:
                if self._closed:
                    return
                try:
                    self._look(round_, part)
                except Exception:  # the watchdog must outlive anything one look meets
                    log.exception("watching an unwaited call to %s failed", part.pieces[0].link.address)

    def _look(self, round_, part) -> None:
        piece = part.pieces[0]
        link = piece.link
        link.poll()
        failed = piece.send_error or link.failed(piece.seq)
        late = not link.replied(piece.seq) and round_.overdue(part)
        # A part the model thread is settling is its own to set (it marks it before taking the reply, so the mark
        # is read after the looks above: a reply taken meanwhile is not mistaken for none).
        if (failed or late) and not part.settling:
            self.rescue(part)
