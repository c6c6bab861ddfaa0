"""``kdcache quickstart``: the whole pipeline, offline, on the built-in digits dataset.

It prints each step as the command it stands for and runs it through the
library function behind that command: train a teacher with CE, dump its logits
for every crop/flip view (and MLKD weak/strong views), train the same small
student from those caches with several losses and with the online teacher, and
compare them in a table and a PNG. Finished steps are reused on a re-run.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from kdcache.dump import dump_logits
from kdcache.inspection import inspect_cache
from kdcache.plots import plot_training
from kdcache.store import make_output_dir
from kdcache.train import finished_run, train_student

TEACHER, STUDENT = "resnet8", "resnet8"


@dataclass
class Row:
    """One line of the quickstart table: last-epoch test metrics, and the best test top-1 over all epochs."""

    method: str
    top1: float
    best_top1: float
    nll: float
    ece: float
    seconds: float

    @classmethod
    def from_history(cls, method: str, history: list[dict]) -> Row:
        """The row of a run from its ``metrics.jsonl`` records."""
        last, best = history[-1], max(h["test_top1"] for h in history)
        seconds = sum(h["seconds"] for h in history)
        return cls(method, last["test_top1"], best, last["test_nll"], last["test_ece"], seconds)


def command_line(name: str, kw: dict, positional: tuple[str, ...] = ()) -> str:
    """The ``kdcache NAME ...`` command that NAME's library function called with ``kw`` stands for.

    Keys in ``positional`` are the command's arguments; the rest become ``--flags``.
    """
    args = [name, *(str(kw[key]) for key in positional)]
    for key, value in kw.items():
        if key in positional:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [x for item in value for x in (flag, str(item))]
        elif isinstance(value, tuple):
            args += [flag, ",".join(map(str, value))]
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return "kdcache " + shlex.join(args)


def _run(name: str, fn: Callable, kw: dict, log: list[str], positional: tuple[str, ...] = ()) -> tuple[object, float]:
    """Print the command a step stands for, run it through the library, return its result and wall time."""
    line = command_line(name, kw, positional)
    click.secho(f"\n$ {line}", bold=True)
    log.append(line)
    t0 = time.perf_counter()
    result = fn(**kw)
    return result, time.perf_counter() - t0


def _train(out: Path, name: str, kw: dict, epochs: int, log: list[str], milestones: tuple) -> tuple[list[dict], float]:
    run_dir = out / name
    done = finished_run(run_dir, epochs)
    if done is not None:
        click.echo(f"\n# {name}: finished earlier, reused ({run_dir})")
        return done, sum(r["seconds"] for r in done)
    kw = {**kw, "dataset": "digits", "epochs": epochs, "lr_milestones": milestones, "batch_size": 64}
    kw |= {"out": str(run_dir), "resume": (run_dir / "last.pt").exists()}
    _, seconds = _run("train-student", train_student, kw, log)
    return finished_run(run_dir, epochs) or [], seconds


def _dump(kw: dict, log: list[str]) -> None:
    summary, _ = _run("dump-logits", dump_logits, kw, log)
    click.echo("\n".join(summary.lines()))


def quickstart(out: str | Path = "data/quickstart", epochs: int = 5, teacher_epochs: int = 10) -> list[Row]:
    """Run the pipeline end to end and return the comparison table's rows (also written to ``out``)."""
    out = make_output_dir(out)
    log: list[str] = []
    t_hist, _ = _train(
        out,
        "teacher",
        {"student": TEACHER, "loss": "ce", "augment": "cifar"},
        teacher_epochs,
        log,
        (int(teacher_epochs * 0.6), int(teacher_epochs * 0.85)),
    )
    ckpt = str(out / "teacher" / "last.pt")
    dump = {"teacher": TEACHER, "checkpoint": ckpt, "dataset": "digits", "forward_block": 256, "batch_size": 256}
    cache, mlkd_cache = str(out / "cache-cifar-all.zarr"), str(out / "cache-mlkd.zarr")
    _dump({**dump, "augment": "cifar", "views": "all", "out": cache}, log)
    _dump({**dump, "augment": "mlkd", "views": epochs, "out": mlkd_cache, "workers": 2}, log)
    report, _ = _run("inspect", inspect_cache, {"location": cache}, log, ("location",))
    click.echo("\n".join(report.lines()))
    milestones = (int(epochs * 0.6), int(epochs * 0.85))
    online = {"teacher": TEACHER, "checkpoint": ckpt, "augment": "cifar", "views": "all", "forward_block": 256}
    methods = [
        ("CE only", {"loss": "ce", "augment": "cifar"}, "ce"),
        ("KD (cache)", {"cache": [cache], "loss": "kd"}, "kd"),
        ("KD + Z-score (cache)", {"cache": [cache], "loss": "kd", "logit_stand": True}, "kd-ls"),
        (
            "DKD + Z-score (cache)",
            {"cache": [cache], "loss": "dkd", "logit_stand": True, "kd_weight": 1.0, "warmup": 2},
            "dkd-ls",
        ),
        (
            "MLKD + Z-score (cache)",
            {"cache": [mlkd_cache], "loss": "mlkd", "logit_stand": True, "kd_weight": 1.0},
            "mlkd-ls",
        ),
        ("KD (online teacher)", {**online, "loss": "kd"}, "kd-online"),
    ]
    rows = [Row.from_history(f"teacher (CE, {teacher_epochs} epochs)", t_hist)]
    curves = {}
    for label, kw, name in methods:
        hist, seconds = _train(out, name, {"student": STUDENT, **kw}, epochs, log, milestones)
        curves[label] = hist
        rows.append(Row.from_history(label, hist))
    table = format_table(rows)
    click.echo("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    png = plot_training(curves, out / "quickstart.png", reference=t_hist[-1]["test_top1"])
    click.echo(f"\nplot: {png}\ntable: {out / 'results.md'}")
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the quickstart results: last-epoch test metrics, plus the best-epoch top-1 (what the
    mdistiller family reports)."""
    lines = [
        "| method | last-epoch top-1 (%) | best-epoch top-1 (%) | NLL | ECE | train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.method} | {r.top1:.2f} | {r.best_top1:.2f} | {r.nll:.3f} | {r.ece:.3f} | {r.seconds:.1f} |" for r in rows
    ]
    return "\n".join(lines)
