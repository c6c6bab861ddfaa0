"""What a report is made of: finished runs (:class:`RunResult`), the rows that group their seeds (:class:`Row`), and
the teacher/student pairs a SPEC's method names may carry (``<teacher>-<student>.<method>``, as the ls-cifar100
preset names them), which the paper-shaped tables and the curves' panels are laid out by."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _value(record: dict[str, Any], key: str) -> float:
    """``record[key]`` as a float; NaN when the run did not record it (a loop of your own may log less)."""
    return float(record[key]) if key in record else math.nan


@dataclass
class RunResult:
    """One finished run: its method, grid point and seed (a sweep's ``run.json`` or a plain run's ``config.yaml``)
    and its per-epoch ``metrics.jsonl`` records."""

    method: str
    grid: dict[str, Any]
    point: str
    seed: int
    reference: float | None
    epochs: int
    history: list[dict[str, Any]]
    path: Path
    order: int = 0  # the method's place in the SPEC (rows follow it)
    kind: str = "sweep"  # "sweep" (run.json) or "run" (config.yaml alone): rows never mix the two
    options: dict[str, Any] = field(default_factory=dict)  # run.json's planned options (teacher, student, ...)

    @property
    def last_top1(self) -> float:
        return float(self.history[-1]["test_top1"])

    @property
    def best_top1(self) -> float:
        return max(float(h["test_top1"]) for h in self.history)

    @property
    def best_epoch(self) -> int:
        """The first epoch that reached the best test top-1 (as ``best.pt`` keeps it)."""
        return next(int(h["epoch"]) for h in self.history if float(h["test_top1"]) == self.best_top1)

    @property
    def top5(self) -> float:
        return _value(self.history[-1], "test_top5")

    @property
    def nll(self) -> float:
        return _value(self.history[-1], "test_nll")

    @property
    def ece(self) -> float:
        return _value(self.history[-1], "test_ece")

    @property
    def train_seconds(self) -> float:
        return float(sum(_value(h, "seconds") for h in self.history))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Row:
    """One method at one grid point: its finished runs (one per seed) and their statistics."""

    method: str
    point: str
    grid: dict[str, Any]
    reference: float | None
    runs: list[RunResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def last_top1(self) -> tuple[float, float | None]:
        """Mean and sample std of the last-epoch top-1 over seeds."""
        return mean_std([r.last_top1 for r in self.runs])

    @property
    def best_top1(self) -> tuple[float, float | None]:
        """Mean and sample std of the best-epoch top-1 over seeds."""
        return mean_std([r.best_top1 for r in self.runs])

    def mean(self, metric: str) -> float:
        """The mean over seeds of a :class:`RunResult` property (``top5``, ``nll``, ``ece``, ``train_seconds``)."""
        return statistics.mean(getattr(r, metric) for r in self.runs)

    @property
    def delta(self) -> float | None:
        """Mean last-epoch top-1 minus the published reference, when there is one."""
        return None if self.reference is None else self.last_top1[0] - self.reference

    @property
    def epochs(self) -> int:
        return max(r.epochs for r in self.runs)


@dataclass(frozen=True)
class Pair:
    """A teacher/student pair: the part of a method name before its first dot (``resnet32x4-resnet8x4``)."""

    name: str
    teacher: str
    student: str

    @property
    def title(self) -> str:
        return f"{self.teacher} → {self.student}" if self.teacher else self.name


def split_method(method: str, options: dict[str, Any]) -> tuple[Pair, str] | None:
    """``resnet32x4-resnet8x4.kd+ls`` -> (its pair, ``kd+ls``), or None for a name that carries no pair.

    A name carries a pair when the part before its first dot is ``<teacher>-<student>``: the run's own teacher and
    student, or (for a run whose options do not say) two names joined by one dash."""
    prefix, dot, rest = method.partition(".")
    if not dot or not prefix or not rest:
        return None
    teacher, student = options.get("teacher"), options.get("student")
    if isinstance(teacher, str) and isinstance(student, str) and prefix == f"{teacher}-{student}":
        return Pair(prefix, teacher, student), rest
    if prefix.count("-") == 1 and "teacher" not in options:
        a, b = prefix.split("-")
        return Pair(prefix, a, b), rest
    return None


def pairs_of(rows: list[Row]) -> dict[int, tuple[Pair, str]] | None:
    """Each row's (pair, method within the pair) by its index, when every row of a sweep carries a pair."""
    found = {}
    for i, row in enumerate(rows):
        if not row.runs or row.runs[0].kind != "sweep":
            return None
        split = split_method(row.method, row.runs[0].options)
        if split is None:
            return None
        found[i] = split
    return found or None
