"""A split call's pieces sent and read at once: one thread per piece beyond the first.

Moving a piece's bytes over TCP is the kernel copying them on the calling thread (`sendmsg` into the
socket's buffer, `recv_into` out of it), about 3 GB/s for one thread on the lent 16-core host. Pieces
on their own connections sent or read one after another are bound by that one thread; from threads of
their own (the copies release the GIL) they move side by side. The first piece runs on the caller's
thread, so a call of one piece (every call under 2 MiB, every same-host call) takes no thread hand-off.

The hand-off is the lightest Python has: the task goes into a SimpleQueue that idle workers wait on, and
the caller waits for it on a lock the worker releases, both in C. (concurrent.futures' Future and its
Condition, in Python, cost about a quarter of the gateway's GIL time on an 8 MiB call in 4 pieces on 2
cores: docs/deployment-sizing.md.)
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
Outcome = tuple[T | None, BaseException | None]

# Workers are shared by every link of the process and started when a task finds none idle, up to this many.
# Tasks never wait on each other, so past it tasks only queue (two micro-batches x a few servers x 3
# extra pieces fit).
MAX_WORKERS = 32


class _Task:
    """One call handed to a worker; `done` is released once `outcome` is set."""

    __slots__ = ("call", "done", "outcome")

    def __init__(self, call: Callable[[], T]):
        self.call = call
        self.outcome: Outcome = (None, None)
        self.done = threading.Lock()
        self.done.acquire()

    def run(self) -> None:
        try:
            self.outcome = self.call(), None
        except BaseException as err:  # handed to the caller, whatever it is: the worker goes on
            self.outcome = None, err
        finally:
            self.done.release()


class _Workers:
    """Daemon threads taking tasks from one queue. `idle` counts workers free for a new task: a submitter
    takes one (or starts a thread if none is free and there is room), a worker gives itself back when done."""

    def __init__(self, limit: int):
        self.limit = limit
        self.tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0
        self.threads = 0

    def submit(self, task: _Task) -> None:
        start = False
        with self.lock:
            if self.idle:
                self.idle -= 1
            elif self.threads < self.limit:
                self.threads += 1
                start = True
        self.tasks.put(task)
        if start:
            threading.Thread(target=self._work, name="side-lanes", daemon=True).start()

    def _work(self) -> None:
        while True:
            self.tasks.get().run()
            with self.lock:
                self.idle += 1


_WORKERS = _Workers(MAX_WORKERS)


def _forked() -> None:  # a forked child has none of its parent's threads
    global _WORKERS
    _WORKERS = _Workers(MAX_WORKERS)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def each(calls: Sequence[Callable[[], T]]) -> list[Outcome]:
    """Run `calls` at once (the first on this thread) and wait for all: (value, None) or (None, error) each."""
    tasks = [_Task(call) for call in calls[1:]]
    for task in tasks:
        _WORKERS.submit(task)
    outcomes = [_outcome(calls[0])] if calls else []
    for task in tasks:
        task.done.acquire()
        outcomes.append(task.outcome)
    return outcomes


def values(outcomes: Sequence[Outcome]) -> list:
    """The outcomes' values, in order; the first error raised instead if any call failed."""
    for _, error in outcomes:
        if error is not None:
            raise error
    return [value for value, _ in outcomes]


def _outcome(call: Callable[[], T]) -> Outcome:
    try:
        return call(), None
    except Exception as err:  # handed to the caller with the others
        return None, err
