"""Where a training run's per-epoch records go: ``metrics.jsonl`` always, TensorBoard event files when installed.

``metrics.jsonl`` (one JSON object per epoch) is the run's record that
kdcache itself reads back (resume, ``finished_run``, plots). The optional
``tensorboard`` package adds event files of the same scalars under
``tensorboard/`` so ``tensorboard --logdir`` can follow runs live; without it
the run folder is otherwise the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _summary_writer_class() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter``, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a crash mid-write) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise KdcacheError(f"{path} line {i + 1} is not a JSON record ({exc.msg}): fix or delete it") from None
    return records


class RunLog:
    """Per-epoch records of one training run in ``out``.

    A fresh run (``resume_epoch=None``) starts an empty ``metrics.jsonl``; a
    run resumed after epoch ``E`` keeps the records with ``epoch <= E`` and
    drops later ones (written after the checkpoint it resumes from). Its
    TensorBoard writer starts with ``purge_step=E + 1`` (0 for a fresh run),
    so TensorBoard hides the events of the epochs that are trained again.
    ``enabled=False`` (torchrun ranks other than 0) keeps the history in
    memory and writes nothing.
    """

    def __init__(self, out: Path, enabled: bool = True, resume_epoch: int | None = None):
        self.out, self.enabled = Path(out), enabled
        self.path = self.out / METRICS_FILE
        if resume_epoch is None:
            self._history: list[dict[str, Any]] = []
        else:
            self._history = [r for r in read_records(self.path) if r["epoch"] <= resume_epoch]
        self._writer = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")  # other ranks may be reading the file
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self._history))
        tmp.replace(self.path)
        writer_class = _summary_writer_class()
        if writer_class is not None:
            purge = 0 if resume_epoch is None else resume_epoch + 1
            self._writer = writer_class(log_dir=str(self.out / TENSORBOARD_DIR), purge_step=purge)

    def history(self) -> list[dict[str, Any]]:
        """The records so far, oldest first (a copy)."""
        return list(self._history)

    def write(self, record: dict[str, Any]) -> None:
        """Add one epoch's record: a line of ``metrics.jsonl`` and its numeric scalars at step ``epoch``."""
        self._history.append(dict(record))
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = int(record["epoch"])
            for key, value in record.items():
                if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()  # an epoch's events are on disk when it ends, like its metrics line

    def close(self) -> None:
        """Flush and close the TensorBoard writer (``metrics.jsonl`` is complete after every ``write``)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
