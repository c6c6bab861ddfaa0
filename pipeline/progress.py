"""Progress that shows in a terminal and in a log: a refreshing tqdm bar on a terminal, plain lines otherwise.

A job whose stderr is not a terminal (nohup, a batch scheduler's log) gets one line per tenth of the work with its
rate and ETA, flushed at once, so a log file shows that the job moves.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm import tqdm


def is_terminal() -> bool:
    return sys.stderr.isatty()


def say(line: str) -> None:
    """A line of progress on stdout, flushed (through tqdm, so a live bar is redrawn below it)."""
    tqdm.write(line)
    sys.stdout.flush()


class Progress:
    """``total`` items of work named ``desc``: a tqdm bar on a terminal, a plain line per 10% otherwise."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, steps: int = 10):
        self.total, self.desc, self.unit, self.steps = max(total, 0), desc, unit, steps
        self.done, self.start, self.shown = 0, time.perf_counter(), 0
        self.plain = enabled and not is_terminal() and total > 0
        self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, disable=None if enabled else True)

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        step = self.done * self.steps // max(self.total, 1)
        if self.plain and step > self.shown:
            self.shown = step
            say(self.line())

    def line(self) -> str:
        """``desc: 40% (575/1438 views, 120 views/s, ETA 7 s)``."""
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100 * self.done / max(self.total, 1)
        return (
            f"{self.desc}: {pct:3.0f}% ({self.done:,}/{self.total:,} {self.unit}s, {rate:,.1f} {self.unit}s/s, "
            f"ETA {eta:,.0f} s)"
        )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
