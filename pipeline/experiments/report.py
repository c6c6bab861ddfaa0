"""The report of a ``kdcache sweep``: ``summary.csv``, ``results.md`` and ``curves.png`` from its run folders alone.

A sweep writes ``DIR/runs/<method>/<point>/seed-<s>/``: an ordinary train-student run folder plus ``run.json``
(method, grid, point, seed, planned epochs, published reference top-1). Only finished runs (last epoch of
``metrics.jsonl`` >= the planned epochs) are reported, so the report can be rebuilt while the sweep still runs; the
same folders always give the same csv and md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.train.runlog import METRICS_FILE, read_records  # noqa: E402

RUN_FILE = "run.json"
SUMMARY_CSV, RESULTS_MD, CURVES_PNG = "summary.csv", "results.md", "curves.png"
_RUN_KEYS = ("method", "grid", "point", "seed", "epochs")
_METRIC_COLUMNS = ("last_top1", "best_top1", "best_epoch", "top5", "nll", "ece", "train_seconds")


@dataclass
class RunResult:
    """One finished run of a sweep: its ``run.json`` fields and its per-epoch ``metrics.jsonl`` records."""

    method: str
    grid: dict[str, Any]
    point: str
    seed: int
    reference: float | None
    epochs: int
    history: list[dict[str, Any]]
    path: Path
    order: int = 0  # the method's place in the SPEC (rows follow it)

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
        return float(self.history[-1]["test_top5"])

    @property
    def nll(self) -> float:
        return float(self.history[-1]["test_nll"])

    @property
    def ece(self) -> float:
        return float(self.history[-1]["test_ece"])

    @property
    def train_seconds(self) -> float:
        return float(sum(float(h["seconds"]) for h in self.history))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
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
        return _mean_std([r.last_top1 for r in self.runs])

    @property
    def best_top1(self) -> tuple[float, float | None]:
        """Mean and sample std of the best-epoch top-1 over seeds."""
        return _mean_std([r.best_top1 for r in self.runs])

    def mean(self, metric: str) -> float:
        """The mean over seeds of a :class:`RunResult` property (``top5``, ``nll``, ``ece``, ``train_seconds``)."""
        return statistics.mean(getattr(r, metric) for r in self.runs)

    @property
    def delta(self) -> float | None:
        """Mean last-epoch top-1 minus the published reference, when there is one."""
        return None if self.reference is None else self.last_top1[0] - self.reference


@dataclass
class Report:
    """What :func:`write_report` found and wrote."""

    rows: list[Row]
    runs: list[RunResult]
    unfinished: int
    summary_csv: Path
    results_md: Path
    curves_png: Path


def _read_run(folder: Path) -> RunResult | None:
    """The run in ``folder``, or None while it is unfinished (``run.json`` or the last metrics line mid-write)."""
    path = folder / RUN_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    except OSError as exc:
        raise KdcacheError(f"cannot read {path} ({exc.strerror or exc}): check its permissions") from None
    missing = [key for key in _RUN_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise KdcacheError(f"{path} lacks {missing[0]!r}: it was not written by kdcache sweep; delete that run folder")
    history = read_records(folder / METRICS_FILE)
    if not history or int(history[-1]["epoch"]) < int(meta["epochs"]):
        return None
    reference = meta.get("reference")
    return RunResult(
        method=str(meta["method"]),
        grid=dict(meta["grid"]),
        point=str(meta["point"]),
        seed=int(meta["seed"]),
        reference=None if reference is None else float(reference),
        epochs=int(meta["epochs"]),
        history=history,
        path=folder,
        order=int(meta.get("order", 0)),
    )


def _scan(sweep_dir: str | Path) -> tuple[list[RunResult], int]:
    """The finished runs of a sweep, ordered by method (as the SPEC lists them), point and seed, and how many runs
    are unfinished."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise KdcacheError(f"sweep folder {root} does not exist: pass the --out folder of a `kdcache sweep`")
    found = [_read_run(p.parent) for p in sorted((root / "runs").glob(f"*/*/seed-*/{RUN_FILE}"))]
    runs = sorted((r for r in found if r is not None), key=lambda r: (r.order, r.method, r.point, r.seed))
    return runs, len(found) - len(runs)


def collect_runs(sweep_dir: str | Path) -> list[RunResult]:
    """The finished runs under ``sweep_dir/runs``, ordered by method, grid point and seed."""
    return _scan(sweep_dir)[0]


def _group_rows(runs: list[RunResult]) -> list[Row]:
    """One :class:`Row` per (method, point), in the order of ``runs``."""
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        row = rows.setdefault((run.method, run.point), Row(run.method, run.point, run.grid, run.reference))
        row.runs.append(run)
        if row.reference is None:
            row.reference = run.reference
    return list(rows.values())


def _grid_options(runs: list[RunResult]) -> list[str]:
    """Every grid option any run has, sorted: one column each."""
    return sorted({key for run in runs for key in run.grid})


def _write(path: Path, data: str | bytes) -> Path:
    """Replace ``path`` in one step (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        tmp.replace(path)
    except OSError as exc:
        raise KdcacheError(f"cannot write {path} ({exc.strerror or exc}): make the sweep folder writable") from None
    return path


def _summary_csv(runs: list[RunResult], path: Path) -> Path:
    """One line per finished run: method, grid options, seed and its final / best metrics."""
    options = _grid_options(runs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", *options, "seed", *_METRIC_COLUMNS])
    for run in runs:
        grid = [run.grid.get(key, "") for key in options]
        writer.writerow([run.method, *grid, run.seed, *(getattr(run, c) for c in _METRIC_COLUMNS)])
    return _write(path, buf.getvalue())


def _pm(mean: float, std: float | None) -> str:
    """``71.31 ± 0.42``; ``71.31 ± –`` when there is a single run."""
    return f"{mean:.2f} ± " + ("–" if std is None else f"{std:.2f}")


def _count(n: int, what: str) -> str:
    """``1 finished run``, ``3 finished runs``."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def _md_line(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _md_row(row: Row, options: list[str]) -> str:
    """One results.md table line for ``row``."""
    ref = "–" if row.reference is None else f"{row.reference:.2f}"
    delta = "–" if row.delta is None else f"{row.delta:+.2f}"
    return _md_line(
        [
            row.method,
            *(row.grid.get(key, "") for key in options),
            row.n,
            _pm(*row.last_top1),
            _pm(*row.best_top1),
            f"{row.mean('top5'):.2f}",
            f"{row.mean('nll'):.3f}",
            f"{row.mean('ece'):.4f}",
            f"{row.mean('train_seconds') / 60:.1f}",
            ref,
            delta,
        ]
    )


def _results_md(rows: list[Row], runs: list[RunResult], unfinished: int, path: Path) -> Path:
    """The per-(method, point) table: mean ± sample std over seeds, and the difference to the published number."""
    lines = ["# Sweep results", ""]
    left_out = f"; {_count(unfinished, 'unfinished run')} left out" if unfinished else ""
    if not runs:
        lines.append(f"No run has finished yet{left_out}.")
        return _write(path, "\n".join(lines) + "\n")
    lines += [f"{_count(len(runs), 'finished run')}{left_out}.", ""]
    options = _grid_options(runs)
    head = ["method", *options, "n", "top-1 last (%)", "top-1 best (%)", "top-5 (%)", "NLL", "ECE", "train min/run"]
    lines.append(_md_line([*head, "reference", "Δ last − ref"]))
    lines.append(_md_line(["---"] * (len(head) + 2)))
    lines += [_md_row(row, options) for row in rows]
    return _write(path, "\n".join(lines) + "\n")


def _curve(row: Row) -> tuple[list[int], list[float], list[float]]:
    """Epochs every run of ``row`` has, with the mean and sample std (0 for one run) of test top-1 there."""
    per_run = [{int(h["epoch"]): float(h["test_top1"]) for h in r.history} for r in row.runs]
    epochs = sorted(set.intersection(*(set(d) for d in per_run)))
    values = [[d[e] for d in per_run] for e in epochs]
    return epochs, [statistics.mean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def _curves_png(rows: list[Row], path: Path) -> Path:
    """Mean test top-1 per epoch with a ± std band, one line per (method, point)."""
    ncol = max(1, math.ceil(len(rows) / 30))
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        epochs, mean, std = _curve(row)
        label = row.method if not row.grid else f"{row.method} {row.point}"
        (line,) = ax.plot(epochs, mean, lw=1, label=f"{label} (n={row.n})")
        low, high = [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, lw=0)
    if rows:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=ncol)
    else:
        ax.text(0.5, 0.5, "no run has finished yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="test top-1, mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # "tight" keeps the legend beside the axes
    finally:
        plt.close(fig)
    return _write(path, buf.getvalue())


def write_report(sweep_dir: str | Path) -> Report:
    """Write ``summary.csv``, ``results.md`` and ``curves.png`` into ``sweep_dir`` from its finished runs."""
    root = Path(sweep_dir)
    runs, unfinished = _scan(root)
    rows = _group_rows(runs)
    return Report(
        rows=rows,
        runs=runs,
        unfinished=unfinished,
        summary_csv=_summary_csv(runs, root / SUMMARY_CSV),
        results_md=_results_md(rows, runs, unfinished, root / RESULTS_MD),
        curves_png=_curves_png(rows, root / CURVES_PNG),
    )
