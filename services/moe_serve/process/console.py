"""What a person starting a service reads: a progress line while weights load, and a startup summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO

RULE = "=" * 80  # above and below a startup summary


class LoadProgress:
    """Counts loaded items on stderr: redrawn in place on a terminal, a line every `every` s in logs."""

    def __init__(self, total: int, what: str = "experts", stream: TextIO | None = None, every: float = 5.0):
        self.total = max(total, 0)
        self.what = what
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every  # in logs (docker, kubectl) a redrawn line would be one huge line: print now and then
        self.done = 0
        self.start = self._last = time.monotonic()

    def __call__(self, *where: object) -> None:
        """One more item loaded; `where` (e.g. layer, expert) names it on the line."""
        self.done += 1
        now = time.monotonic()
        last = self.done >= self.total
        if self.tty or last or now - self._last >= self.every:
            self._last = now
            self._write(self.line(where), last)

    def line(self, where: tuple = ()) -> str:
        """The progress text: bar, count, percentage, elapsed time."""
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * 24)
        label = f"  (layer {where[0]} expert {where[1]})" if len(where) == 2 else ""
        return (f"Loading {self.what} [{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} "
                f"{fraction:4.0%} {time.monotonic() - self.start:5.1f}s{label}")

    def _write(self, text: str, last: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if last else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def summary(title: str, rows: list[tuple[str, str]], width: int = 80) -> str:
    """A boxed block of 'key  value' rows under a title, printed once a service is ready."""
    key_width = max((len(k) for k, _ in rows), default=0)
    lines = ["=" * width, title, "-" * width]
    lines += [f"  {key.ljust(key_width)}  {value}" for key, value in rows]
    lines.append("=" * width)
    return "\n".join(lines)
