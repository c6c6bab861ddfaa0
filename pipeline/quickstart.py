"""``kdcache quickstart``: the whole pipeline, offline, on the built-in digits dataset.

It types and runs the real commands: train a teacher with CE, dump its logits
for every crop/flip view (and MLKD weak/strong views), train the same small
student from those caches with several losses and with the online teacher, and
compare them in a table and a PNG. Finished steps are reused on a re-run.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import click

from kdcache.plots import plot_training
from kdcache.train import finished_run

TEACHER, STUDENT = "resnet8", "resnet8"


@dataclass
class Row:
    """One line of the quickstart table."""

    method: str
    top1: float
    nll: float
    ece: float
    seconds: float


def _run(args: list[str], log: list[str]) -> float:
    """Print a command as it would be typed, run it in-process, return its wall time."""
    from kdcache.cli import main

    line = "kdcache " + shlex.join(args)
    click.secho(f"\n$ {line}", bold=True)
    log.append(line)
    t0 = time.perf_counter()
    main.main(args=args, prog_name="kdcache", standalone_mode=False)
    return time.perf_counter() - t0


def _train(
    out: Path, name: str, extra: list[str], epochs: int, log: list[str], milestones: str
) -> tuple[list[dict], float]:
    run_dir = out / name
    done = finished_run(run_dir, epochs)
    if done is not None:
        click.echo(f"\n# {name}: finished earlier, reused ({run_dir})")
        return done, sum(r["seconds"] for r in done)
    args = [
        "train-student",
        *extra,
        "--dataset",
        "digits",
        "--epochs",
        str(epochs),
        "--lr-milestones",
        milestones,
        "--batch-size",
        "64",
        "--out",
        str(run_dir),
    ]
    if (run_dir / "last.pt").exists():
        args.append("--resume")
    seconds = _run(args, log)
    return finished_run(run_dir, epochs) or [], seconds


def quickstart(out: str | Path = "data/quickstart", epochs: int = 5, teacher_epochs: int = 10) -> list[Row]:
    """Run the pipeline end to end and return the comparison table's rows (also written to ``out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    t_hist, _ = _train(
        out,
        "teacher",
        ["--student", TEACHER, "--loss", "ce", "--augment", "cifar"],
        teacher_epochs,
        log,
        f"{int(teacher_epochs * 0.6)},{int(teacher_epochs * 0.85)}",
    )
    ckpt = str(out / "teacher" / "last.pt")
    dump = [
        "dump-logits",
        "--teacher",
        TEACHER,
        "--checkpoint",
        ckpt,
        "--dataset",
        "digits",
        "--forward-block",
        "256",
        "--batch-size",
        "256",
    ]
    cache, mlkd_cache = out / "cache-cifar-all.zarr", out / "cache-mlkd.zarr"
    _run([*dump, "--augment", "cifar", "--views", "all", "--out", str(cache)], log)
    _run([*dump, "--augment", "mlkd", "--views", str(epochs), "--out", str(mlkd_cache), "--workers", "2"], log)
    _run(["inspect", str(cache)], log)
    milestones = f"{int(epochs * 0.6)},{int(epochs * 0.85)}"
    student = ["--student", STUDENT]
    methods = [
        ("CE only", [*student, "--loss", "ce", "--augment", "cifar"], "ce"),
        ("KD (cache)", [*student, "--cache", str(cache), "--loss", "kd"], "kd"),
        ("KD + Z-score (cache)", [*student, "--cache", str(cache), "--loss", "kd", "--logit-stand"], "kd-ls"),
        (
            "DKD + Z-score (cache)",
            [*student, "--cache", str(cache), "--loss", "dkd", "--logit-stand", "--kd-weight", "1", "--warmup", "2"],
            "dkd-ls",
        ),
        (
            "MLKD + Z-score (cache)",
            [*student, "--cache", str(mlkd_cache), "--loss", "mlkd", "--logit-stand", "--kd-weight", "1"],
            "mlkd-ls",
        ),
        (
            "KD (online teacher)",
            [
                *student,
                "--teacher",
                TEACHER,
                "--checkpoint",
                ckpt,
                "--augment",
                "cifar",
                "--views",
                "all",
                "--forward-block",
                "256",
                "--loss",
                "kd",
            ],
            "kd-online",
        ),
    ]
    rows = [
        Row(
            "teacher (CE, " + str(teacher_epochs) + " epochs)",
            t_hist[-1]["test_top1"],
            t_hist[-1]["test_nll"],
            t_hist[-1]["test_ece"],
            sum(r["seconds"] for r in t_hist),
        )
    ]
    curves = {}
    for label, args, name in methods:
        hist, seconds = _train(out, name, args, epochs, log, milestones)
        curves[label] = hist
        rows.append(
            Row(
                label,
                hist[-1]["test_top1"],
                hist[-1]["test_nll"],
                hist[-1]["test_ece"],
                sum(r["seconds"] for r in hist),
            )
        )
    table = format_table(rows)
    click.echo("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    png = plot_training(curves, out / "quickstart.png", reference=t_hist[-1]["test_top1"])
    click.echo(f"\nplot: {png}\ntable: {out / 'results.md'}")
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the quickstart results (last-epoch test metrics)."""
    lines = ["| method | test top-1 (%) | NLL | ECE | train time (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.top1:.2f} | {r.nll:.3f} | {r.ece:.3f} | {r.seconds:.1f} |" for r in rows]
    return "\n".join(lines)
