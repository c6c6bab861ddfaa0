"""``kdcache quickstart``: the whole pipeline, offline, on the built-in digits dataset.

It prints each step as the command it stands for and runs it through the
library function behind that command: train a teacher with CE, dump its float32
logits for seeded crop/flip views (and MLKD weak/strong views), then sweep the
same small student over several losses and seeds from those caches (and KD with
the teacher online), and compare them as mean ± std in a table and a PNG.
Finished steps are reused on a re-run.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from kdcache.dataset.datasets import build_dataset, test_split
from kdcache.dump.loop import dump_logits
from kdcache.experiments.report import Report, write_report
from kdcache.experiments.sweep import load_spec, run_sweep
from kdcache.settings import QUICKSTART_DEFAULTS as Q
from kdcache.settings import check_options
from kdcache.store.cache import make_output_dir
from kdcache.train.runfolder import finished_run
from kdcache.train.trainer import train_student

TEACHER, STUDENT = "resnet8", "resnet8"
LABELS = {
    "ce": "CE only",
    "kd": "KD (cache)",
    "kd-online": "KD (online teacher)",
    "kd+ls": "KD + Z-score (cache)",
    "dkd+ls": "DKD + Z-score (cache)",
    "mlkd+ls": "MLKD + Z-score (cache)",
}


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


_Result = TypeVar("_Result")


def _run(
    name: str, fn: Callable[..., _Result], kw: dict, log: list[str], positional: tuple[str, ...] = ()
) -> tuple[_Result, float]:
    """Print the command a step stands for, run it through the library, return its result and wall time."""
    line = command_line(name, kw, positional)
    print(f"\n$ {line}", flush=True)
    log.append(line)
    t0 = time.perf_counter()
    result = fn(**kw)
    return result, time.perf_counter() - t0


def _train(out: Path, name: str, kw: dict, epochs: int, log: list[str], milestones: tuple) -> tuple[list[dict], float]:
    run_dir = out / name
    done = finished_run(run_dir, epochs)
    if done is not None:
        print(f"\n# {name}: finished earlier, reused ({run_dir})", flush=True)
        return done, sum(r["seconds"] for r in done)
    kw = {**kw, "dataset": "digits", "epochs": epochs, "lr_milestones": milestones, "batch_size": 32}
    kw |= {"out": str(run_dir), "resume": (run_dir / "last.pt").exists()}
    _, seconds = _run("train-student", train_student, kw, log)
    return finished_run(run_dir, epochs) or [], seconds


def _dump(kw: dict, log: list[str]) -> None:
    summary, _ = _run("dump-logits", dump_logits, kw, log)
    print("\n".join(summary.lines()), flush=True)


def _spec(ckpt: str, cache: str, mlkd_cache: str, epochs: int, seeds: tuple[int, ...]) -> dict[str, object]:
    """The quickstart's sweep: each method from the float32 caches (and KD with the teacher online), per seed."""
    teacher = {"teacher": TEACHER, "checkpoint": ckpt, "augment": "cifar", "views": epochs, "forward-block": 64}
    milestones = f"{int(epochs * 0.6)},{int(epochs * 0.85)}"
    return {
        "dataset": "digits",
        "student": STUDENT,
        "epochs": epochs,
        "batch-size": 32,
        "lr-milestones": milestones,
        "methods": {
            "ce": {"loss": "ce", "cache": [cache]},
            "kd": {"loss": "kd", "cache": [cache]},
            "kd-online": {"loss": "kd", "online": True, **teacher},
            "kd+ls": {"loss": "kd", "logit-stand": True, "cache": [cache]},
            "dkd+ls": {
                "loss": "dkd",
                "logit-stand": True,
                "kd-weight": 1.0,
                "warmup": 2,
                "cache": [cache],
            },
            "mlkd+ls": {"loss": "mlkd", "logit-stand": True, "kd-weight": 1.0, "cache": [mlkd_cache]},
        },
        "seeds": list(seeds),
    }


def quickstart(
    out: str | Path = Q.out,
    epochs: int = Q.epochs,
    teacher_epochs: int | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    parallel: int = Q.parallel,
) -> Report:
    """Run the pipeline end to end: a teacher, two float32 caches, then a sweep of every method over ``seeds``.

    The table (``results.md`` in ``out``) reports each method as mean ± std over the seeds, and says whether the
    cached and the online KD students came out bit-identical.
    """
    check_options({"epochs": epochs, "parallel": parallel, "out": out})
    teacher_epochs = teacher_epochs or max(2, round(4 * epochs / 3))
    out = make_output_dir(out)
    log: list[str] = []
    milestones = (int(teacher_epochs * 0.6), int(teacher_epochs * 0.85))
    t_hist, _ = _train(
        out, "teacher", {"student": TEACHER, "loss": "ce", "augment": "cifar"}, teacher_epochs, log, milestones
    )
    ckpt = str(out / "teacher" / "last.pt")
    dump = {"teacher": TEACHER, "checkpoint": ckpt, "dataset": "digits", "views": epochs, "dtype": "float32"}
    dump |= {"forward_block": 64, "batch_size": 256}  # the online teacher's block: bit-identical logits
    cache, mlkd_cache = str(out / "cache-cifar.zarr"), str(out / "cache-mlkd.zarr")
    _dump({**dump, "augment": "cifar", "out": cache}, log)
    _dump({**dump, "augment": "mlkd", "out": mlkd_cache, "workers": 2}, log)
    spec_path = out / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(ckpt, cache, mlkd_cache, epochs, seeds), sort_keys=False))
    sweep = {"spec": str(spec_path), "out": str(out / "sweep"), "parallel": parallel, "threads": 1}
    _run("sweep", _sweep, sweep, log, ("spec",))
    report = write_report(out / "sweep")
    identical = identical_online(out / "sweep", seeds)
    test_images = len(build_dataset("digits", split=test_split("digits")))
    table = results_table(report, t_hist, identical) + "\n\n" + "\n".join(comparisons(report, test_images))
    print("\n" + table, flush=True)
    (out / "results.md").write_text(table + "\n")
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    plot = plot_methods(report, out / "quickstart.png", identical)
    print(f"\nplot: {plot}\ntable: {out / 'results.md'}", flush=True)
    return report


def _sweep(spec: str, out: str, parallel: int, threads: int) -> object:
    return run_sweep(load_spec(spec), out, parallel=parallel, threads=threads)


def identical_online(sweep_dir: Path, seeds: tuple[int, ...]) -> bool:
    """Whether KD from the float32 cache and KD with the online teacher trained bit-identical students, every seed."""
    runs = sweep_dir / "runs"
    for seed in seeds:
        a, b = (runs / m / "default" / f"seed-{seed}" / "last.pt" for m in ("kd", "kd-online"))
        wa, wb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
        if any(not torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


def results_table(report: Report, teacher: list[dict], identical: bool) -> str:
    """The quickstart table: the teacher, then every method as mean ± std over its seeds."""
    lines = [
        "| method | n | last-epoch top-1 (%) | best-epoch top-1 (%) | NLL | ECE | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| teacher (CE, {len(teacher)} epochs) | 1 | {teacher[-1]['test_top1']:.2f} | "
        f"{max(h['test_top1'] for h in teacher):.2f} | {teacher[-1]['test_nll']:.3f} | {teacher[-1]['test_ece']:.3f} | "
        f"{sum(h['seconds'] for h in teacher):.1f} |",
    ]
    for row in report.rows:
        last, best = (f"{m:.2f} ± {s:.2f}" if s is not None else f"{m:.2f}" for m, s in (row.last_top1, row.best_top1))
        nll, ece, secs = row.mean("nll"), row.mean("ece"), row.mean("train_seconds")
        label = LABELS.get(row.method, row.method)
        lines.append(f"| {label} | {row.n} | {last} | {best} | {nll:.3f} | {ece:.3f} | {secs:.1f} |")
    same = "bit-identical" if identical else "NOT bit-identical"
    lines.append(
        f"\nKD (cache) and KD (online teacher) see the same float32 teacher logits and views: their students are "
        f"{same} in every seed."
    )
    return "\n".join(lines)


#: The significance level a difference must reach before the quickstart calls it clear.
ALPHA = 0.05


def comparisons(report: Report, test_images: int, baseline: str = "ce", alpha: float = ALPHA) -> list[str]:
    """Each method's last-epoch top-1 against ``baseline``'s, with Welch's t-test over the seeds: a sentence per
    method, saying "within noise" unless p < ``alpha``. Generated from the runs, so the prose is what they show."""
    from scipy.stats import ttest_ind

    rows = {r.method: r for r in report.rows}
    base = rows.get(baseline)
    if base is None or base.n < 2:
        return []
    lines = [
        f"Against {LABELS.get(baseline, baseline)} (Welch's t-test on last-epoch test top-1 over seeds, two-sided; a "
        f"difference counts only at p < {alpha}; one test image is {100 / test_images:.2f} points of the "
        f"{test_images}-image test split):"
    ]
    for method, row in rows.items():
        if method == baseline or row.n < 2:
            continue
        a, b = [r.last_top1 for r in row.runs], [r.last_top1 for r in base.runs]
        diff, p = row.last_top1[0] - base.last_top1[0], float(ttest_ind(a, b, equal_var=False).pvalue)
        verdict = f"{'above' if diff > 0 else 'below'} it" if p < alpha else "within noise"
        lines.append(
            f"- {LABELS.get(method, method)}: {diff:+.2f} points (n = {row.n} and {base.n}, p = {p:.2f}): {verdict}."
        )
    return lines


def plot_methods(report: Report, path: Path, identical: bool) -> Path:
    """Mean test top-1 per epoch of each method (± std band) under the table's names; a line drawn under an identical
    one says so in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdcache.experiments.report import _curve

    fig, ax = plt.subplots(figsize=(8, 5))
    styles: dict[str, dict[str, Any]] = {"kd-online": {"ls": "--", "lw": 2.5}}
    for row in report.rows:
        epochs, mean, std = _curve(row)
        label = LABELS.get(row.method, row.method)
        if row.method == "kd" and identical:
            label += " = KD (online teacher), drawn under it"
        (line,) = ax.plot(epochs, mean, label=label, **styles.get(row.method, {"lw": 1.5}))
        low, high = [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title=f"quickstart: mean ± std over {report.rows[0].n} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
