"""What a sweep needs before its first dump, checked at once and said in the SPEC's terms, and the work ahead.

Every dataset the runs train on opens, every teacher checkpoint a dump needs exists, and a SPEC that asks for a CUDA
device gets one; all the problems found go into one ``error:`` line that names the SPEC keys to set (a SPEC has no
flags). A preset states its work ahead (runs × epochs) before it starts; on a machine without a GPU it adds an
estimate from one timed training step of each student and starts only when told to (``--yes``).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from kdcache.dataset.datasets import build_dataset
from kdcache.errors import KdcacheError
from kdcache.settings.table import SETTINGS, TRAIN
from kdcache.store.cache import local_path

#: Where a preset's files come from, for its refusals.
PRESET_HELP = {
    "ls-cifar100": {
        "checkpoint": "untar cifar_teachers.tar of github.com/megvii-research/mdistiller/releases/tag/checkpoints "
        "into download_ckpts/",
    }
}
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")
#: Test-time and data cost over the training steps of an epoch, for the CPU estimate.
_EPOCH_OVERHEAD = 1.1


def in_spec_terms(message: str) -> str:
    """A train-student message about flags, about SPEC keys: ``pass --download or --data-root DIR`` becomes ``set
    download: true or data-root: DIR``."""

    def key(match: re.Match[str]) -> str:
        setting = SETTINGS.get(match[1].replace("-", "_"))
        if setting is None or TRAIN not in setting.uses:
            return match[0]
        return f"{match[1]}: true" if setting.kind == "bool" else f"{match[1]}:"

    return (
        _FLAG.sub(key, message).replace("pass download:", "set download:").replace("pass data-root:", "set data-root:")
    )


def _datasets(runs: list[Any]) -> dict[tuple[str, str | None, bool], Any]:
    """One run per distinct (dataset, data root, download) of the runs."""
    found: dict[tuple[str, str | None, bool], Any] = {}
    for run in runs:
        o = run.options
        if isinstance(o.get("dataset"), str):
            root = o.get("data_root")
            found.setdefault((o["dataset"], None if root is None else str(root), bool(o.get("download"))), run)
    return found


def _data_problems(runs: list[Any], preset: str | None) -> tuple[list[str], dict[str, int]]:
    """Each dataset that does not open, in SPEC terms, and the training samples of each that does."""
    problems, sizes = [], {}
    for (name, root, download), run in _datasets(runs).items():
        try:
            sizes[name] = len(build_dataset(name, root, "train", download))
        except KdcacheError as exc:
            problems.append(f"run {run.name}: {in_spec_terms(str(exc))} in the SPEC")
    return problems, sizes


def _checkpoint_problems(dumps: Mapping[str, Mapping[str, Any]], preset: str | None) -> list[str]:
    """One problem naming every teacher checkpoint a dump needs that does not exist."""
    missing = []
    for plan in dumps.values():
        ckpt = plan.get("checkpoint")
        lp = local_path(str(ckpt)) if ckpt else None
        if lp is not None and not lp.is_file() and str(ckpt) not in missing:
            missing.append(str(ckpt))
    if not missing:
        return []
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    hint = PRESET_HELP.get(preset or "", {}).get("checkpoint") or "put the files there or fix checkpoint: in the SPEC"
    many = len(missing) > 1
    return [f"{len(missing)} teacher checkpoint{'s' if many else ''} named by the SPEC's checkpoint: "
            f"{'are' if many else 'is'} missing ({shown}): {hint}"]  # fmt: skip


def _device_problems(runs: list[Any]) -> list[str]:
    import torch

    wanted = sorted({str(r.options["device"]) for r in runs if str(r.options.get("device", "")).startswith("cuda")})
    if wanted and not torch.cuda.is_available():
        return [f"the SPEC sets device: {wanted[0]}, but no CUDA GPU is visible: set device: auto or cpu"]
    return []


def check_inputs(
    runs: list[Any], dumps: Mapping[str, Mapping[str, Any]], preset: str | None = None, source: str = "SPEC"
) -> dict[str, int]:
    """Every dataset, teacher checkpoint and device the sweep needs, before anything is dumped or trained; all the
    problems in one error line (a preset's names its file, ``source``). Returns the training samples of each
    dataset."""
    problems, sizes = _data_problems(runs, preset)
    problems += _checkpoint_problems(dumps, preset)
    problems += _device_problems(runs)
    if problems:
        suffix = f" (preset {preset}: to change its keys, copy {source} to a SPEC of your own and edit that)"
        raise KdcacheError("; also ".join(problems) + (suffix if preset else ""))
    return sizes


def _step_seconds(student: str, classes: int, batch: int, size: int, threads: int) -> float:
    """Seconds of one SGD step of ``student`` on a random batch, on this CPU with ``threads`` threads."""
    import torch

    from kdcache.models.factory import create_model

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = create_model(student, classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
        times = []
        for _ in range(2):  # the first step warms up allocators
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return times[-1]
    finally:
        torch.set_num_threads(saved)


def cpu_seconds(runs: list[Any], sizes: Mapping[str, int], threads: int) -> float:
    """Student training seconds of ``runs`` on this CPU: per run, its epochs × its steps per epoch × one timed step
    of its student (× 2 for the two views of MLKD), plus a tenth for testing."""
    timed: dict[tuple[str, int, int, int], float] = {}
    total = 0.0
    for run in runs:
        o = run.options
        dataset = str(o.get("dataset"))
        classes = 100 if dataset == "cifar100" else 10 if dataset == "digits" else 1000
        size = 32 if dataset in ("cifar100", "digits") else 224
        batch = int(o.get("batch_size") or SETTINGS["batch_size"].default(TRAIN))
        key = (str(o.get("student")), classes, batch, size)
        if key not in timed:
            timed[key] = _step_seconds(*key, threads)
        steps = math.ceil(sizes.get(dataset, 50_000) / batch)
        views = 2 if o.get("loss") == "mlkd" else 1
        total += run.epochs * steps * timed[key] * views * _EPOCH_OVERHEAD
    return total


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def work_ahead(
    name: str, runs: list[Any], todo: list[Any], dumps: int, sizes: Mapping[str, int], parallel: int, threads: int,
    yes: bool,
) -> str:  # fmt: skip
    """The preset's work: runs × epochs, what is left, the dumps; on a CPU an estimate, and without ``yes`` a
    refusal (nothing is written)."""
    import torch

    by_epochs: dict[int, int] = {}
    for run in runs:
        by_epochs[run.epochs] = by_epochs.get(run.epochs, 0) + 1
    spread = ", ".join(f"{n} × {e}" for e, n in sorted(by_epochs.items()))
    epochs = sum(r.epochs for r in runs)
    text = (
        f"preset {name}: {len(runs)} runs, {epochs:,} student epochs (runs × epochs: {spread}); "
        f"{len(todo)} runs to go"
        + (f", {dumps} teacher cache{'s' if dumps != 1 else ''} to dump first" if dumps else "")
    )
    if torch.cuda.is_available():
        return f"{text}; on {torch.cuda.device_count()} GPU(s) ({torch.cuda.get_device_name(0)})"
    if not todo:
        return text
    at_once = max(1, min(parallel, _cores() // max(threads, 1)))
    estimate = cpu_seconds(todo, sizes, threads) / at_once
    from kdcache.experiments.monitor import duration

    text += (
        f"; no GPU is visible: on this CPU about {duration(estimate)} of student training at --parallel {parallel} "
        f"--threads {threads} (one timed step of each student; the teacher dumps come on top)"
    )
    if not yes:
        raise KdcacheError(f"{text}: pass --yes to start it on this CPU anyway, or run it on a GPU host")
    return text
