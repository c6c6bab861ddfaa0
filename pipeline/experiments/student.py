"""One sweep student: ``train-student`` on a run folder's plan, with the command's exit codes (2 on a refusal).

The sweep's forked students call :func:`train_plan`; a dask worker runs it as ``python -m kdcache.experiments.student
FOLDER`` in a process of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.settings import read_settings
from kdcache.settings.table import TRAIN
from kdcache.train.trainer import train_student

PLAN_FILE = "plan.yaml"


def train_plan(folder: str | Path) -> int:
    """Train (or resume) the run in ``folder`` from its ``plan.yaml``; prints its last line, returns the exit code."""
    try:
        settings: Mapping[str, Any] = read_settings(Path(folder) / PLAN_FILE, TRAIN)  # train_student checks them
        result = train_student(**settings, out=folder, resume=True)
    except KdcacheError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(f"last-epoch test top-1 {result.last.get('test_top1', float('nan')):.2f}%  -> {result.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(train_plan(sys.argv[1]))
