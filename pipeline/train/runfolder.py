"""A run folder's lifecycle: its lock, the checkpoint a resume continues, saving, and what a resume must find
unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from kdcache.errors import KdcacheError
from kdcache.feed.ranks import Ranks
from kdcache.losses.objective import Objective
from kdcache.models.checkpoints import save_checkpoint
from kdcache.store.cache import make_output_dir
from kdcache.train.config import LOSS_OPTIONS, TrainConfig
from kdcache.train.runlog import METRICS_FILE, read_records

#: Settings a run folder made by an earlier kdcache does not record, with the values those runs used.
LEGACY_SETTINGS = {
    "view_schedule": "sample",
    "ctkd_decay": "cosine",
    "ctkd_decay_epochs": 10,
    "ctkd_decay_max": 0.0,
    "ctkd_decay_min": -1.0,
    "loss_opt": {},
    "lr_decay_rate": 0.1,
    "amp": "none",
    "channels_last": False,
    "compile": False,
}


@contextlib.contextmanager
def run_lock(out: Path, ranks: Ranks) -> Iterator[None]:
    """Hold ``out`` for this run (rank 0 creates it and takes ``out/.lock``): a second run into it is refused.

    A run that stops before its first epoch is saved leaves ``out`` as it found it: a folder it created is removed,
    and in a folder that existed only the files it added are.
    """
    if not ranks.main:
        yield
        return
    before = set(os.listdir(out)) if out.is_dir() else None
    make_output_dir(out)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KdcacheError(f"{out} is in use by another running student: wait for it or choose another --out") from None
    try:
        yield
    except BaseException:
        if not (out / "last.pt").exists():
            _remove_added(out, before)
        raise
    finally:
        os.close(fd)


def _remove_added(out: Path, before: set[str] | None) -> None:
    """Remove what a run that saved nothing added to ``out`` (``out`` itself when it did not exist)."""
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in set(os.listdir(out)) - before:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def resume_state(out: Path, resume: bool, ranks: Ranks) -> dict | None:
    """The checkpoint to continue (``--resume`` of a run that saved one), refusing to start over a saved run."""
    ranks.barrier()  # every rank checks the output folder before rank 0 writes to it
    last = out / "last.pt"
    if not last.exists():
        return None
    if not resume:
        raise KdcacheError(f"{out} already holds a run (last.pt): pass --resume to continue it or choose another --out")
    return torch.load(last, map_location="cpu", weights_only=True)


def stored_record(state: dict) -> dict:
    """A checkpoint's run record, with the values of settings older runs did not record."""
    return {**LEGACY_SETTINGS, **state.get("config", {})}


def restore(
    state: dict | None,
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[int, float]:
    """Load a resumed run's weights and optimizer; the first epoch to train and the best top-1 so far."""
    if state is None:
        return 1, -1.0
    model.load_state_dict(state["model"])
    if objective.ctkd is not None:
        objective.ctkd.load_state_dict(state["ctkd"])
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, float(state["best_top1"])


def save_run(
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    scaler: torch.amp.GradScaler,
    epoch: int,
    best: float,
    record: dict,
    improved: bool,
) -> None:
    """``best.pt`` when the epoch improved top-1, and ``last.pt`` (all a resume needs) every epoch."""
    if improved:
        save_checkpoint(out / "best.pt", model, epoch=epoch, test_top1=best)
    extra = {"ctkd": objective.ctkd.state_dict()} if objective.ctkd is not None else {}
    if scaler.is_enabled():
        extra["scaler"] = scaler.state_dict()
    save_checkpoint(
        out / "last.pt", model, optimizer=optimizer.state_dict(), epoch=epoch, best_top1=best, config=record, **extra
    )


def check_resume(stored: dict, record: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse ``--resume`` when a setting differs from the run in ``out``, naming it with both values.

    A run started before a setting was recorded resumes with the value it was started with
    (:data:`LEGACY_SETTINGS`); options the run's loss does not use are not compared.
    """
    if cfg.ctkd and "ctkd_decay" not in stored:
        raise KdcacheError(
            f"the CTKD run in {out} was started before CTKD's lambda schedule moved one epoch earlier (as upstream): "
            "it cannot resume on the new schedule; start it again in a new --out"
        )
    stored = {**LEGACY_SETTINGS, **stored, "epochs": cfg.epochs}
    spec = cfg.spec
    unused = set(LOSS_OPTIONS) - set(spec.options) - ({"warmup"} if spec.warmup else set())
    keys = sorted((stored.keys() | record.keys()) - unused)
    diff = [k for k in keys if stored.get(k) != record.get(k)]
    if diff:
        what = "; ".join(f"{k}: run has {stored.get(k)!r}, this command {record.get(k)!r}" for k in diff)
        raise KdcacheError(f"--resume with different settings than the run in {out} ({what}): use the original command")


def finished_run(run_dir: str | Path, epochs: int) -> list[dict] | None:
    """The metrics history of a run folder that already trained ``epochs`` epochs, else None (not started or cut
    off)."""
    rows = read_records(Path(run_dir) / METRICS_FILE)
    return rows if rows and rows[-1]["epoch"] >= epochs else None
