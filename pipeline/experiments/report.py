"""The report of run folders: ``summary.csv``, ``results.md`` and ``curves.png`` from the run folders alone.

A sweep writes ``DIR/runs/<method>/<point>/seed-<s>/``: an ordinary train-student run folder plus ``run.json``
(method, grid, point, seed, planned epochs, published reference top-1), and ``DIR/sweep.json``, the runs its SPEC
names (with ``DIR/spec.yaml``, a copy of the SPEC). The report holds exactly those runs: a run folder in ``runs/`` that
the SPEC no longer names is listed as not in this SPEC and never enters a mean. Any other folder under a ``DIR``
without ``sweep.json`` that holds ``config.yaml`` and ``metrics.jsonl`` (a ``train-student`` run, or a loop of your
own that writes them, e.g. with :class:`kdcache.RunLog`) is a plain run: its method is ``config.yaml``'s ``loss``
(``+ls`` with ``logit-stand``) or its parent folder's name, its seed ``config.yaml``'s ``seed``, and the settings that
differ between runs of one method are its grid, so the seeds of the same settings form one row. Only finished runs
(last epoch of ``metrics.jsonl`` >= the planned epochs) are reported, so the report can be rebuilt while runs still
train; the same folders always give the same csv and md.
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

import yaml

from kdcache.errors import KdcacheError
from kdcache.experiments.results import Row, RunResult, pairs_of
from kdcache.experiments.tables import count, flat_table, grid_options, notes, paper_tables, stale_lines
from kdcache.plots import Curve, figure_png, sweep_figure
from kdcache.train.runlog import METRICS_FILE, TENSORBOARD_DIR, read_records

RUN_FILE, CONFIG_FILE = "run.json", "config.yaml"
SUMMARY_CSV, RESULTS_MD, CURVES_PNG = "summary.csv", "results.md", "curves.png"
#: Written by a sweep into its --out: the runs its SPEC names (sweep.json) and the SPEC itself (spec.yaml).
MANIFEST_FILE, SPEC_FILE = "sweep.json", "spec.yaml"
#: Where ``--prune`` moves the run folders the SPEC no longer names.
PRUNED_DIR = "pruned"
_RUN_KEYS = ("method", "grid", "point", "seed", "epochs")
_METRIC_COLUMNS = ("last_top1", "best_top1", "best_epoch", "top5", "nll", "ece", "train_seconds")
#: config.yaml keys that are not settings of a run: runs that differ only in these are seeds of one row.
_NOT_SETTINGS = ("seed", "out", "resume", "progress")
#: A single panel holds at most this many curves; more are split into small multiples.
_ONE_PANEL = 10

__all__ = [
    "Report",
    "Row",
    "RunResult",
    "collect_runs",
    "read_manifest",
    "stale_runs",
    "write_manifest",
    "write_report",
]


@dataclass
class Report:
    """What :func:`write_report` found and wrote."""

    rows: list[Row]
    runs: list[RunResult]
    unfinished: int
    summary_csv: Path
    results_md: Path
    curves_png: Path
    stale: list[str] = field(default_factory=list)  # run folders in runs/ that the sweep's SPEC no longer names
    planned: int | None = None  # the runs the SPEC names (None without sweep.json)

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        """The files written: ``summary.csv``, ``results.md`` and ``curves.png``."""
        return self.summary_csv, self.results_md, self.curves_png


def _read_run(folder: Path) -> RunResult | None:
    """The run in ``folder``, or None while it is unfinished (``run.json`` or the last metrics line mid-write)."""
    path = folder / RUN_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, FileNotFoundError):
        return None  # being written, or a run of the SPEC not planned yet
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
        options=dict(meta.get("options") or {}),
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
        dirs[:] = sorted(d for d in dirs if d != TENSORBOARD_DIR and not (Path(folder) == root and d == PRUNED_DIR))
        if RUN_FILE in names:  # a sweep's run folder (one --prune moved aside, or one out of place): never plain
            continue
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


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """A sweep folder's ``sweep.json`` (the runs its SPEC names, in order), or None when it has none."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise KdcacheError(f"cannot read {path} ({exc}): re-run the sweep, which rewrites it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise KdcacheError(f"{path} lists no runs: it was not written by kdcache sweep; re-run the sweep")
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``sweep.json`` in one step."""
    return _write(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def _sweep_folders(root: Path) -> list[Path]:
    return [p.parent for p in sorted((root / "runs").glob(f"*/*/seed-*/{RUN_FILE}"))]


def stale_runs(folder: str | Path, names: list[str] | None = None) -> list[str]:
    """The sweep run folders in ``folder/runs`` (as ``method/point/seed-s``) that ``names`` (default: the runs of
    ``sweep.json``) does not hold; none without a manifest."""
    root = Path(folder)
    if names is None:
        manifest = read_manifest(root)
        if manifest is None:
            return []
        names = [str(n) for n in manifest["runs"]]
    keep = set(names)
    found = [str(p.relative_to(root / "runs")) for p in _sweep_folders(root)]
    return [name for name in found if name not in keep]


@dataclass
class _Found:
    runs: list[RunResult]
    unfinished: int
    stale: list[str]
    manifest: dict[str, Any] | None


def _scan(folder: str | Path) -> _Found:
    """The finished runs under ``folder`` and how many are unfinished. With ``sweep.json``: the SPEC's runs in its
    order, the other run folders as stale. Without: a sweep's runs ordered by method (as the SPEC lists them), point
    and seed, then the plain runs ordered by method, point and seed."""
    root = Path(folder)
    if not root.is_dir():
        raise KdcacheError(
            f"sweep folder {root} does not exist: pass the --out folder of a `kdcache sweep` or a folder of run folders"
        )
    manifest = read_manifest(root)
    if manifest is not None:
        names = [str(n) for n in manifest["runs"]]
        found = [_read_run(root / "runs" / name) for name in names]
        runs = [r for r in found if r is not None]
        return _Found(runs, len(found) - len(runs), stale_runs(root, names), manifest)
    sweep_folders = _sweep_folders(root)
    found = [_read_run(p) for p in sweep_folders]
    runs = sorted((r for r in found if r is not None), key=lambda r: (r.order, r.method, r.point, r.seed))
    plain, plain_unfinished = _plain_runs(root, set(sweep_folders))
    return _Found(runs + plain, len(found) - len(runs) + plain_unfinished, [], None)


def collect_runs(folder: str | Path) -> list[RunResult]:
    """The finished runs under ``folder``: a sweep's (its SPEC's, by method, grid point and seed), then plain runs."""
    return _scan(folder).runs


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
    options = grid_options(runs)
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


def _curve(row: Row) -> tuple[list[int], list[float], list[float]]:
    """Epochs every run of ``row`` has, with the mean and sample std (0 for one run) of test top-1 there."""
    per_run = [{int(h["epoch"]): float(h["test_top1"]) for h in r.history} for r in row.runs]
    epochs = sorted(set.intersection(*(set(d) for d in per_run)))
    values = [[d[e] for d in per_run] for e in epochs]
    return epochs, [statistics.mean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def _counts(found: _Found) -> str:
    """``8 of 8 runs of this SPEC finished.``; without a SPEC ``12 finished runs; 3 unfinished runs left out.``"""
    if found.manifest is not None:
        planned = len(found.manifest["runs"])
        text = f"{len(found.runs)} of {count(planned, 'run')} of this SPEC finished"
        return text + (f"; {count(found.unfinished, 'unfinished run')} left out." if found.unfinished else ".")
    left_out = f"; {count(found.unfinished, 'unfinished run')} left out" if found.unfinished else ""
    if not found.runs:
        return f"No run has finished yet{left_out}."
    return f"{count(len(found.runs), 'finished run')}{left_out}."


def _configs(runs: list[RunResult]) -> list[dict[str, Any]]:
    """The ``config.yaml`` of every finished sweep run that has one (the header's shared settings)."""
    found = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for run in runs:
        try:
            config = yaml.load((run.path / CONFIG_FILE).read_text(encoding="utf-8"), Loader=loader)
        except (OSError, yaml.YAMLError):
            return []  # a run without one (a folder made by hand): state only the SPEC's settings
        found.append(config if isinstance(config, dict) else {})
    return found


def _results_md(rows: list[Row], found: _Found, path: Path) -> Path:
    """The header, the paper-shaped tables (when the methods carry teacher/student pairs), the table of every method
    and grid point (mean ± sample std over seeds, and the difference to the published number), the stale runs."""
    runs = found.runs
    plain = bool(runs) and all(r.kind == "run" for r in runs)
    lines = ["# Run results" if plain else "# Sweep results", "", _counts(found), ""]
    lines += stale_lines(found.stale)
    if not runs:
        if found.manifest is not None:
            lines.append("No run has finished yet.")
        return _write(path, "\n".join(lines).rstrip("\n") + "\n")
    lines += notes(rows, found.manifest, _configs(runs))
    seeds = len((found.manifest or {}).get("seeds") or []) or max(r.n for r in rows)
    paper = paper_tables(rows, seeds)
    lines += paper
    if paper:
        lines += ["## Every method and grid point", ""]
    lines += flat_table(rows, runs)
    return _write(path, "\n".join(lines) + "\n")


def curve_panels(rows: list[Row]) -> tuple[dict[str, list[Curve]], list[str], list[str]]:
    """The curves of ``rows`` as small multiples: one panel per teacher/student pair when the methods carry pairs,
    else one panel (up to 10 curves) or one per method group (the name before its first ``+``); with the methods
    (one colour each) and grid points (one shade each) in order."""
    split = pairs_of(rows)
    methods = list(dict.fromkeys(split[i][1] if split else r.method for i, r in enumerate(rows)))
    points = list(dict.fromkeys(r.point for r in rows))
    panels: dict[str, list[Curve]] = {}
    for i, row in enumerate(rows):
        epochs, mean, std = _curve(row)
        if split:
            pair, method = split[i]
            panel = pair.title
        else:
            method = row.method
            panel = "" if len(rows) <= _ONE_PANEL else row.method.split("+")[0]
        shade = points.index(row.point)
        panels.setdefault(panel, []).append(Curve(method, row.point, epochs, mean, std, row.n, shade, len(points)))
    if not split and len(panels) > 1:  # a method group's panel is titled by its methods: "kd, kd+ls"
        panels = {", ".join(dict.fromkeys(c.method for c in curves)): curves for curves in panels.values()}
    return panels, methods, points if len(points) > 1 else []


def _curves_png(rows: list[Row], path: Path) -> Path:
    """Mean test top-1 per epoch with a ± std band per (method, point), as small multiples with one legend."""
    panels, methods, points = curve_panels(rows)
    n = max((r.n for r in rows), default=0)
    title = f"test top-1 per epoch, mean ± std over seeds (n = {n})" if rows else "test top-1 per epoch"
    return _write(path, figure_png(sweep_figure(panels, methods, points, title)))


def write_report(folder: str | Path) -> Report:
    """Write ``summary.csv``, ``results.md`` and ``curves.png`` into ``folder`` from the finished runs under it: a
    sweep's (those its SPEC names, by ``sweep.json``) or, in a folder without one, every run folder holding
    ``config.yaml`` and ``metrics.jsonl``."""
    root = Path(folder)
    found = _scan(root)
    rows = _group_rows(found.runs)
    return Report(
        rows=rows,
        runs=found.runs,
        unfinished=found.unfinished,
        summary_csv=_summary_csv(found.runs, root / SUMMARY_CSV),
        results_md=_results_md(rows, found, root / RESULTS_MD),
        curves_png=_curves_png(rows, root / CURVES_PNG),
        stale=found.stale,
        planned=None if found.manifest is None else len(found.manifest["runs"]),
    )
