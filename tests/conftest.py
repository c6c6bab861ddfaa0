"""Shared fixtures: tiny datasets written in the real on-disk formats, and teacher checkpoints."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model

os.environ.setdefault("OMP_NUM_THREADS", "2")


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


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path / "data")


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> dict[int, Path]:
    """resnet8 teacher checkpoints in the zoo layout for 10 and 100 classes (seeded random weights)."""
    out = {}
    d = tmp_path_factory.mktemp("ckpt")
    for classes in (10, 100):
        torch.manual_seed(classes)
        model = create_model("resnet8", classes)
        for m in model.modules():  # non-trivial BN statistics so eval-mode outputs are meaningful
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        out[classes] = d / f"resnet8_{classes}.pth"
        save_checkpoint(out[classes], model, epoch=240)
    return out


def run_cli(*args: str, check: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``kdcache ARGS`` in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def assert_same_arrays(a: str | Path, b: str | Path) -> None:
    """Two stores (paths or URLs) hold the same arrays, with the same dtypes and bit for bit (NaN equal to NaN)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = np.asarray(ga[name][...]), np.asarray(gb[name][...])
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
