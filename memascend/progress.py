"""A dependency-free progress bar for long CLI work (the demo, benchmarks).

On a terminal it redraws one line on stderr (``\\r``); when stderr is a file or a pipe (CI
logs) it prints a plain line at most every ``log_every`` seconds, so logs stay readable. The
caller supplies a short status text (for example the current loss) with each update. The
library itself never prints: only the CLI and the benchmarks use this.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Optional


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60:d}:{s % 60:02d}"


class Progress:
    """Progress of ``total`` units of work, drawn on ``stream`` (default stderr).

    ``update(done, status)`` redraws; ``close()`` ends the line. ``enabled=False`` draws
    nothing (e.g. under ``--json`` when stderr is not a terminal).
    """

    def __init__(self, total: int, label: str = "", *, stream: Optional[IO[str]] = None,
                 enabled: bool = True, width: int = 24, log_every: float = 10.0):
        if total <= 0:
            raise ValueError(f"progress total must be positive, got {total}")
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.log_every = log_every
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last_log = -float("inf")
        self._drawn = False

    def line(self, done: int, status: str = "") -> str:
        """The text of the bar for ``done`` units (no newline)."""
        done = min(max(done, 0), self.total)
        frac = done / self.total
        fill = int(frac * self.width)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        bar = "#" * fill + "-" * (self.width - fill)
        text = f"{self.label} [{bar}] {done}/{self.total} {_fmt_s(elapsed)}<{_fmt_s(eta)}"
        return f"{text} {status}".rstrip()

    def update(self, done: int, status: str = "") -> None:
        """Redraw for ``done`` units completed."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(done, status))
            self._drawn = True
        elif now - self._last_log >= self.log_every or done >= self.total:
            self.stream.write(self.line(done, status) + "\n")
            self._last_log = now
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (on a terminal)."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
