"""What the tests share besides fixtures: tiny datasets in the real on-disk formats, the CLI as a user runs it, and
store comparisons. ``tests`` is on ``sys.path`` (``pythonpath`` in pyproject.toml), so tests import these with
``from helpers import ...``; conftest.py holds the fixtures."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import zarr


def write_cifar100(root: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """A ``cifar-100-python`` folder of pickles as torchvision's CIFAR100 reads them."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 100).tolist()
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        entry = {
            "data": data,
            "fine_labels": labels,
            "coarse_labels": [x // 5 for x in labels],
            "filenames": [f"img{i}.png" for i in range(n)],
            "batch_label": name,
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    with open(base / "meta", "wb") as f:
        pickle.dump(
            {
                "fine_label_names": [f"class{i}" for i in range(100)],
                "coarse_label_names": [f"super{i}" for i in range(20)],
            },
            f,
        )
    return root


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 48), seed: int = 0
) -> Path:
    """An ImageFolder tree of PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


def run_cli(*args: str, check: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``kdcache ARGS`` in a subprocess, as a user would: for what needs a process of its own (signals, a
    fresh interpreter's settings, the installed entry point). Costs an interpreter and torch start-up (seconds)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cli(*args, check: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``kdcache ARGS`` in this process (click's runner, warnings off as in :func:`run_cli`): the same exit code,
    stdout and stderr as :func:`run_cli` without a process start. An exception that escapes the CLI (which a user
    would see as a traceback) gives exit code 1 with its traceback on stderr."""
    from click.testing import CliRunner

    from kdcache.cli import main

    args = [str(a) for a in args]
    with warnings.catch_warnings(), contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, args)
    code, stderr = result.exit_code, result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        code, stderr = 1, stderr + "".join(traceback.format_exception(*result.exc_info))
    if check and code != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({code}):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(["kdcache", *args], code, result.stdout, stderr)


def assert_same_arrays(a: str | Path, b: str | Path) -> None:
    """Two stores (paths or URLs) hold the same arrays, with the same dtypes and bit for bit (NaN equal to NaN)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = np.asarray(ga[name][...]), np.asarray(gb[name][...])
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def same_weights(a: Path, b: Path) -> bool:
    """Two checkpoint files (``last.pt``, ``best.pt``) hold bit-identical model weights."""
    import torch

    wa, wb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


#: The LS repo's README "Results and Logs": table 1 (same family), then table 2 (different architectures).
LS_PAIRS = [
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
    ("wrn_40_2", "wrn_40_1"),
    ("wrn_40_2", "wrn_16_2"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet110", "resnet20"),
    ("resnet32x4", "ShuffleV2"),
    ("resnet32x4", "wrn_16_2"),
    ("resnet32x4", "wrn_40_2"),
    ("wrn_40_2", "resnet8x4"),
    ("wrn_40_2", "MobileNetV2"),
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
]
LS_METHODS = ["kd", "kd+ls", "ctkd", "ctkd+ls", "dkd", "dkd+ls", "mlkd", "mlkd+ls"]  # its methods, each ± Z-score
