"""``kdcache study views``: how many cached views does a student need?

Trains the same student (same seed, epochs and hyper-parameters) from the first
1, 2, 4, 8, ... views of one cache, and once with the online teacher on fresh
views of the same recipe and seed, then plots final test top-1 against the
number of cached views with the online run as the reference line. A run that
already finished in the study folder is reused and an interrupted one resumed,
so re-running the same command after a crash only does the missing work.
"""

from __future__ import annotations

import json
import numbers
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.settings import STUDY_DEFAULTS as S
from kdcache.settings import check_options
from kdcache.store.cache import check_output_dir, json_float, json_int, make_output_dir
from kdcache.store.checks import open_checked
from kdcache.train.runfolder import finished_run
from kdcache.train.trainer import train_student

#: What a study folder holds: one run folder per point, the results and the plot.
STUDY_ENTRIES = re.compile(r"views-[0-9]+|online|study\.json|views\.png")


@dataclass
class StudyPoint:
    """One student run of the study."""

    views: int | None  # None: the online teacher
    final_top1: float
    best_top1: float
    run: str


def default_counts(num_views: int) -> list[int]:
    """1, 2, 4, ... up to ``num_views`` (which is included even when it is not a power of two)."""
    counts, n = [], 1
    while n < num_views:
        counts.append(n)
        n *= 2
    return counts + [num_views]


def _check_counts(counts: Sequence[int] | None, num_views: int) -> list[int]:
    """The distinct view counts to train from, sorted (default :func:`default_counts`); each must be in 1..num_views."""
    if not counts:
        return default_counts(num_views)
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
        raise KdcacheError(f"--counts takes integers such as 1,2,4,8, got {counts!r}")
    distinct = sorted(set(counts))
    if distinct[0] < 1 or distinct[-1] > num_views:
        raise KdcacheError(f"--counts must lie in 1..{num_views} (the views the cache holds), got {distinct}")
    return distinct


def _study_dir(out: str | Path) -> Path:
    """Create the study folder, refusing one that is a file, lies in a cache store, holds files a study does not
    write, or cannot be created.

    A study's own folder (its runs, ``study.json``, ``views.png``) is resumed; anything else there is a user's.
    """
    out = check_output_dir(out)
    foreign = sorted(p.name for p in out.iterdir() if not STUDY_ENTRIES.fullmatch(p.name)) if out.is_dir() else []
    if foreign:
        raise KdcacheError(
            f"--out {out} holds {foreign[0]!r}, which a study does not write: choose a new or empty folder"
        )
    return make_output_dir(out)


def _point(views: int | None, run: Path, epochs: int, **kwargs) -> StudyPoint:
    history = finished_run(run, epochs)
    if history is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reusing views is the point of the study
            history = train_student(out=run, resume=(run / "last.pt").exists(), epochs=epochs, **kwargs).history
    return StudyPoint(views, history[-1]["test_top1"], max(h["test_top1"] for h in history), str(run))


def study_views(
    *,
    cache: str,
    student: str,
    dataset: str,
    out: str | Path,
    teacher: str | None = S.teacher,
    checkpoint: str | None = S.checkpoint,
    weights: str | None = S.weights,
    counts: list[int] | tuple[int, ...] | None = S.counts,
    epochs: int = S.epochs,
    data_root: str | None = S.data_root,
    progress: bool = True,
    **train_kwargs: object,
) -> list[StudyPoint]:
    """Train ``student`` from the first ``counts`` views of ``cache`` (and online from ``teacher``); write
    ``study.json`` and ``views.png``.

    ``train_kwargs`` go to :func:`kdcache.train.trainer.train_student` unchanged (loss,
    hyper-parameters, device, workers), so every point differs only in the
    number of views it may draw from.
    """
    check_options({"epochs": epochs, **train_kwargs})
    store = open_checked(cache)
    if store.attrs["views_mode"] == "all":
        raise KdcacheError(
            f"{cache} enumerates all views in a fixed order: the study needs a cache of seeded views (--views N)"
        )
    counts = _check_counts(counts, store.num_views)
    out = _study_dir(out)
    common = dict(student=student, dataset=dataset, data_root=data_root, progress=progress, **train_kwargs)
    points = []
    for n in counts:
        if progress:
            print(f"study: training from the first {n} view(s) of {cache}", flush=True)
        points.append(_point(n, out / f"views-{n}", epochs, cache=cache, cache_views=n, **common))
    if teacher is not None:
        if progress:
            print(f"study: training with the online teacher {teacher} on fresh views", flush=True)
        recipe = store.attr_dict("recipe")
        points.append(
            _point(
                None,
                out / "online",
                epochs,
                teacher=teacher,
                checkpoint=checkpoint,
                weights=weights,
                augment=recipe["name"],
                mix=recipe.get("mix", "none"),
                mix_alpha=json_float(recipe.get("mix_alpha", 1.0), "recipe.mix_alpha"),
                view_seed=json_int(store.attrs["seed"], "seed"),
                forward_block=json_int(store.attr_dict("teacher")["forward_block"], "teacher.forward_block"),
                **common,
            )
        )
    (out / "study.json").write_text(
        json.dumps({"cache": cache, "epochs": epochs, "points": [asdict(p) for p in points]}, indent=2)
    )
    from kdcache.plots import plot_views_study

    plot_views_study(points, out / "views.png", epochs)
    return points
