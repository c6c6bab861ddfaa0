"""The report of run folders: ``summary.csv``, ``results.md`` and ``curves.png`` from the run folders alone.

A sweep writes ``DIR/runs/<method>/<point>/seed-<s>/``: an ordinary train-student run folder plus ``run.json``
(method, grid, point, seed, planned epochs, published reference top-1). Any other folder under ``DIR`` that holds
``config.yaml`` and ``metrics.jsonl`` (a ``train-student`` run, or a loop of your own that writes them, e.g. with
:class:`kdcache.RunLog`) is a plain run: its method is ``config.yaml``'s ``loss`` (``+ls`` with ``logit-stand``) or
its parent folder's name, its seed ``config.yaml``'s ``seed``, and the settings that differ between runs of one method
are its grid, so the seeds of the same settings form one row. Only finished runs (last epoch of ``metrics.jsonl`` >=
the planned epochs) are reported, so the report can be rebuilt while runs still train; the same folders always give
the same csv and md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.train.runlog import METRICS_FILE, TENSORBOARD_DIR, read_records  # noqa: E402

RUN_FILE, CONFIG_FILE = "run.json", "config.yaml"
SUMMARY_CSV, RESULTS_MD, CURVES_PNG = "summary.csv", "results.md", "curves.png"
_RUN_KEYS = ("method", "grid", "point", "seed", "epochs")
_METRIC_COLUMNS = ("last_top1", "best_top1", "best_epoch", "top5", "nll", "ece", "train_seconds")
#: config.yaml keys that are not settings of a run: runs that differ only in these are seeds of one row.
_NOT_SETTINGS = ("seed", "out", "resume", "progress")


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

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        """The files written: ``summary.csv``, ``results.md`` and ``curves.png``."""
        return self.summary_csv, self.results_md, self.curves_png


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


def _text(value: object) -> str:
    """A setting as a grid point names it (as a sweep does): ``true``, ``4``, ``data_c8.zarr``."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("/", "_").replace(" ", "")


def _run_folders(root: Path, skip: set[Path]) -> list[Path]:
    """Folders under ``root`` (``root`` too) holding ``config.yaml`` and ``metrics.jsonl``, other than ``skip``;
    cache stores and TensorBoard folders are not searched."""
    found = []
    for folder, dirs, names in os.walk(root):
        if "zarr.json" in names:  # a cache store: thousands of chunk files, never a run
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if d != TENSORBOARD_DIR)
        if CONFIG_FILE in names and METRICS_FILE in names and Path(folder) not in skip:
            found.append(Path(folder))
    return sorted(found)


def _read_config(folder: Path) -> dict[str, Any] | None:
    """A plain run's ``config.yaml``, or None while it is being written."""
    path = folder / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    except OSError as exc:
        raise KdcacheError(f"cannot read {path} ({exc.strerror or exc}): check its permissions") from None
    if config is not None and not isinstance(config, dict):
        raise KdcacheError(f"{path} is not a mapping of settings: write the run's settings there, or move the folder")
    return config


def _plain_method(config: dict[str, Any], folder: Path) -> str:
    """``config.yaml``'s loss (``kd+ls`` with ``logit-stand``), else the name of the run folder's parent."""
    loss = config.get("loss")
    if not isinstance(loss, str) or not loss:
        return folder.parent.name
    return loss + ("+ls" if config.get("logit-stand", config.get("logit_stand")) is True else "")


def _read_plain(folder: Path) -> RunResult | None:
    """The plain run in ``folder`` with its settings as ``grid`` (narrowed later), or None while unfinished."""
    config, history = _read_config(folder), read_records(folder / METRICS_FILE)
    if config is None or not history:
        return None
    path = folder / METRICS_FILE
    for record in history:
        if not isinstance(record, dict) or "epoch" not in record or "test_top1" not in record:
            raise KdcacheError(f"{path} has a record without 'epoch' or 'test_top1': log both every epoch")
    planned, last = config.get("epochs"), int(history[-1]["epoch"])
    epochs = planned if isinstance(planned, int) and not isinstance(planned, bool) else last
    if last < epochs:
        return None
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise KdcacheError(f"{folder / CONFIG_FILE} has seed {seed!r}: a run's seed is an integer")
    settings = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    return RunResult(_plain_method(config, folder), settings, "", seed, None, epochs, history, folder, kind="run")


def _varying(runs: list[RunResult]) -> list[str]:
    """The settings that differ between runs of one method (a missing setting differs from any value), sorted."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run.grid)
    found = set()
    for settings in by_method.values():
        for key in {k for s in settings for k in s}:
            if len({json.dumps(s[key], sort_keys=True, default=str) if key in s else None for s in settings}) > 1:
                found.add(key)
    return sorted(found)


def _plain_runs(root: Path, skip: set[Path]) -> tuple[list[RunResult], int]:
    """The finished plain runs under ``root``, grouped by the settings that vary (their grid), and how many are
    unfinished."""
    found = [_read_plain(folder) for folder in _run_folders(root, skip)]
    runs = [r for r in found if r is not None]
    options = _varying(runs)
    for run in runs:
        run.grid = {k: run.grid[k] for k in options if k in run.grid}
        run.point = ",".join(f"{k}={_text(v)}" for k, v in run.grid.items()) or "default"
    runs.sort(key=lambda r: (r.method, r.point, r.seed, str(r.path)))
    return runs, len(found) - len(runs)


def _scan(folder: str | Path) -> tuple[list[RunResult], int]:
    """The finished runs under ``folder``, and how many runs are unfinished: a sweep's runs ordered by method (as the
    SPEC lists them), point and seed, then the plain runs ordered by method, point and seed."""
    root = Path(folder)
    if not root.is_dir():
        raise KdcacheError(
            f"sweep folder {root} does not exist: pass the --out folder of a `kdcache sweep` or a folder of run folders"
        )
    sweep_folders = [p.parent for p in sorted((root / "runs").glob(f"*/*/seed-*/{RUN_FILE}"))]
    found = [_read_run(p) for p in sweep_folders]
    runs = sorted((r for r in found if r is not None), key=lambda r: (r.order, r.method, r.point, r.seed))
    plain, plain_unfinished = _plain_runs(root, set(sweep_folders))
    return runs + plain, len(found) - len(runs) + plain_unfinished


def collect_runs(folder: str | Path) -> list[RunResult]:
    """The finished runs under ``folder``: a sweep's (``runs/``, by method, grid point and seed), then plain runs."""
    return _scan(folder)[0]


def _group_rows(runs: list[RunResult]) -> list[Row]:
    """One :class:`Row` per (method, point), in the order of ``runs`` (a sweep's and plain runs apart)."""
    rows: dict[tuple[str, str, str], Row] = {}
    for run in runs:
        key = (run.kind, run.method, run.point)
        row = rows.setdefault(key, Row(run.method, run.point, run.grid, run.reference))
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
        metrics = [_cell(getattr(run, c)) for c in _METRIC_COLUMNS]
        writer.writerow([run.method, *grid, run.seed, *metrics])
    return _write(path, buf.getvalue())


def _cell(value: object) -> object:
    """A csv cell: empty for a metric the run did not record (NaN)."""
    return "" if isinstance(value, float) and math.isnan(value) else value


def _num(value: float, spec: str) -> str:
    """``value`` formatted with ``spec``; ``–`` for a metric the runs did not record (NaN)."""
    return "–" if math.isnan(value) else format(value, spec)


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
            _num(row.mean("top5"), ".2f"),
            _num(row.mean("nll"), ".3f"),
            _num(row.mean("ece"), ".4f"),
            _num(row.mean("train_seconds") / 60, ".1f"),
            ref,
            delta,
        ]
    )


def _results_md(rows: list[Row], runs: list[RunResult], unfinished: int, path: Path) -> Path:
    """The per-(method, point) table: mean ± sample std over seeds, and the difference to the published number."""
    plain = bool(runs) and all(r.kind == "run" for r in runs)
    lines = ["# Run results" if plain else "# Sweep results", ""]
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


def write_report(folder: str | Path) -> Report:
    """Write ``summary.csv``, ``results.md`` and ``curves.png`` into ``folder`` from the finished runs under it: a
    sweep's (``runs/``) and any other run folder holding ``config.yaml`` and ``metrics.jsonl``."""
    root = Path(folder)
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
