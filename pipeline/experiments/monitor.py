"""A sweep's progress, per epoch: each running student's ``metrics.jsonl`` is read as it grows.

One line per run state change (``started``, ``resumed``, ``finished`` with its top-1, ``failed`` with the last line
of its log) on stdout. Per finished epoch: on a terminal, a refreshing display (the sweep's bar over every run's
epochs with its ETA, and a line per running student: epoch e/E, last top-1, its ETA); otherwise (nohup, a batch
scheduler's log) one plain line per finished epoch, flushed at once. The sweep's ETA comes from the epochs finished
since it started: the epochs left over the epochs per second so far.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from tqdm import tqdm

from kdcache.errors import KdcacheError
from kdcache.train.runlog import METRICS_FILE, read_records

#: At most this many per-student lines on a terminal (a dask cluster may run hundreds at once).
LIVE_LINES = 16
#: Seconds between two looks at the running students' metrics files.
POLL_SECONDS = 0.5


class SweepRunLike(Protocol):
    name: str
    folder: Path
    epochs: int


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3:04 h``, ``2 d 03 h``; ``?`` while there is no estimate."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    if hours < 48:
        return f"{int(hours)}:{int(seconds % 3600 // 60):02d} h"
    return f"{int(hours // 24)} d {int(hours % 24):02d} h"


@dataclass
class _Watched:
    """A running student: how far its metrics file is read and the seconds of its epochs."""

    run: Any
    folder: Path
    done: int = 0  # the last epoch seen
    size: int = -1
    top1: float | None = None
    seconds: list[float] = field(default_factory=list)
    bar: Any = None

    def eta(self) -> float:
        recent = self.seconds[-5:]
        if not recent:
            return float("nan")
        return sum(recent) / len(recent) * (self.run.epochs - self.done)


class SweepMonitor:
    """Progress of one sweep over ``runs`` in ``out`` (``enabled=False``: state lines only).

    ``terminal`` (default: whether stderr is one) picks the refreshing display over plain per-epoch lines."""

    def __init__(
        self,
        runs: list[Any],
        out: Path,
        enabled: bool = True,
        terminal: bool | None = None,
        stream: TextIO | None = None,
    ):
        self.out, self.enabled = out, enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.stream = stream
        self.total = sum(r.epochs for r in runs)
        self.runs_total = len(runs)
        self.done_epochs = sum(min(_epochs_done(out / r.folder), r.epochs) for r in runs)
        self.runs_done = 0
        self.session_epochs, self.start = 0, time.monotonic()
        self.active: dict[str, _Watched] = {}
        self.waiting: dict[str, Any] = {}  # dask tasks not yet started on a worker
        self.last_poll = 0.0
        self.bar = None
        if enabled and self.terminal:
            self.bar = tqdm(
                total=self.total, initial=self.done_epochs, desc="sweep", unit="epoch", file=stream,
                dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs{postfix}",
            )  # fmt: skip
            self._refresh()

    # ---------------------------------------------------------------- lines
    def say(self, text: str) -> None:
        tqdm.write(text)
        sys.stdout.flush()

    def line(self, run: Any, state: str) -> None:
        self.say(f"{state:<9} {run.name}")

    def eta(self) -> float:
        """Seconds until every run has finished, from the epochs finished since the sweep started."""
        elapsed = time.monotonic() - self.start
        if self.session_epochs == 0 or elapsed <= 0:
            return float("nan")
        return (self.total - self.done_epochs) / (self.session_epochs / elapsed)

    def _sweep_text(self) -> str:
        return (
            f"sweep {self.done_epochs:,}/{self.total:,} epochs ({100 * self.done_epochs / max(self.total, 1):.0f}%), "
            f"{self.runs_done}/{self.runs_total} runs, ETA {duration(self.eta())}"
        )

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.runs_done}/{self.runs_total} runs, ETA {duration(self.eta())}")

    # ---------------------------------------------------------------- run life
    def queued(self, run: Any) -> None:
        """A dask task submitted: ``started`` is printed when its worker starts it (it writes ``task.json``)."""
        self.line(run, "queued")
        self.waiting[run.name] = run

    def started(self, run: Any, resumed: bool) -> None:
        self.line(run, "resumed" if resumed else "started")
        self.waiting.pop(run.name, None)
        watched = _Watched(run, self.out / run.folder)
        watched.done = min(_epochs_done(watched.folder), run.epochs)
        if self.enabled and self.terminal and len(self.active) < LIVE_LINES:
            watched.bar = tqdm(
                total=run.epochs, initial=watched.done, desc=f"  {run.name}", file=self.stream, leave=False,
                dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} epochs{postfix}",
            )  # fmt: skip
        self.active[run.name] = watched

    def ended(self, run: Any) -> None:
        """A run's process ended (the caller then prints finished or failed): its last epochs are read first."""
        watched = self.active.pop(run.name, None)
        self.waiting.pop(run.name, None)
        if watched is not None:
            self._read(watched)
            if watched.bar is not None:
                watched.bar.close()
        self.runs_done += 1
        self._refresh()

    # ---------------------------------------------------------------- polling
    def poll(self, force: bool = False) -> None:
        """Read the metrics of the running students (at most every :data:`POLL_SECONDS`) and report new epochs;
        start the dask tasks whose worker has started them."""
        now = time.monotonic()
        if not force and now - self.last_poll < POLL_SECONDS:
            return
        self.last_poll = now
        for run in list(self.waiting.values()):
            marker = _read_task(self.out / run.folder)
            if marker is not None:
                self.started(run, bool(marker.get("resumed")))
        for watched in list(self.active.values()):
            self._read(watched)

    def _read(self, watched: _Watched) -> None:
        path = watched.folder / METRICS_FILE
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size == watched.size:
            return
        watched.size = size
        with contextlib.suppress(KdcacheError, OSError, ValueError):
            for record in read_records(path):
                epoch = int(record.get("epoch", 0))
                if epoch <= watched.done:
                    continue
                self._epoch(watched, epoch, record)

    def _epoch(self, watched: _Watched, epoch: int, record: dict[str, Any]) -> None:
        gained = epoch - watched.done
        watched.done = epoch
        self.done_epochs += gained
        self.session_epochs += gained
        if isinstance(record.get("test_top1"), int | float):
            watched.top1 = float(record["test_top1"])
        if isinstance(record.get("seconds"), int | float):
            watched.seconds.append(float(record["seconds"]))
        if not self.enabled:
            return
        top1 = "–" if watched.top1 is None else f"{watched.top1:.2f}%"
        run_text = f"epoch {epoch}/{watched.run.epochs}, top-1 {top1}, ETA {duration(watched.eta())}"
        if self.terminal:
            if watched.bar is not None:
                watched.bar.update(gained)
                watched.bar.set_postfix_str(f"top-1 {top1}, ETA {duration(watched.eta())}")
            if self.bar is not None:
                self.bar.update(gained)
            self._refresh()
        else:
            self.say(f"{'epoch':<9} {watched.run.name}: {run_text}; {self._sweep_text()}")

    def close(self) -> None:
        for watched in self.active.values():
            if watched.bar is not None:
                watched.bar.close()
        if self.bar is not None:
            self.bar.close()


def _epochs_done(folder: Path) -> int:
    """The last epoch in a run folder's metrics.jsonl (0 before its first)."""
    try:
        records = read_records(folder / METRICS_FILE)
    except (KdcacheError, OSError, ValueError):
        return 0
    return int(records[-1].get("epoch", 0)) if records else 0


TASK_FILE = "task.json"


def _read_task(folder: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads((folder / TASK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
