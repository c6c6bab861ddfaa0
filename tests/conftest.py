"""Shared fixtures: tiny datasets written in the real on-disk formats, teacher checkpoints, and caches dumped once per
session. Helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch starts its thread pool: the same in CLI subprocesses

import hashlib  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import write_cifar100  # noqa: E402

from kdcache.models.checkpoints import save_checkpoint  # noqa: E402
from kdcache.models.factory import create_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def remote_cache_dir(tmp_path_factory) -> Path:
    """Where remote reads keep what they fetch (``--cache-dir``'s default) for the whole session, CLI subprocesses
    included: never the user's own cache folder."""
    path = tmp_path_factory.mktemp("kdcache-cache-dir")
    os.environ["KDCACHE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """A CIFAR-100 folder of this test's own, which it may change (same images as :func:`cifar_data`)."""
    return write_cifar100(tmp_path / "data")


@pytest.fixture(scope="session")
def cifar_data(tmp_path_factory) -> Path:
    """The session's CIFAR-100 folder, which the session caches are dumped from: read it, never change it (a test
    that changes its data takes :func:`cifar_root`, which holds the same images)."""
    return write_cifar100(tmp_path_factory.mktemp("cifar") / "data")


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


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file of a store: any change, new file or removal shows."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="session")
def make_cache(tmp_path_factory, teacher_ckpt, cifar_data):
    """``make_cache(**options)``: the path of a cache dumped once per session for each distinct set of options.

    ``options`` are :func:`~kdcache.dump.loop.dump_logits` arguments over these defaults: a resnet8 teacher
    (``teacher_ckpt`` for the dataset's class count), ``dataset="cifar100"`` (from :func:`cifar_data`),
    ``augment="cifar"``, ``views=2``, float16; ``samples=N`` dumps the first N samples of the built-in digits
    only. The returned cache is shared: read it, never change it (the session's end checks every file is as
    dumped). A test that changes a cache passes ``copy_to=DIR`` and gets its own copy, ``DIR/<name>.zarr``.
    """
    base = tmp_path_factory.mktemp("caches")
    made: dict[str, tuple[Path, dict[str, str]]] = {}

    def make(*, copy_to: Path | None = None, samples: int | None = None, **options) -> Path:
        from kdcache.dump.loop import dump_logits

        options = {"teacher": "resnet8", "dataset": "cifar100", "augment": "cifar", "views": 2, **options}
        classes = 100 if options["dataset"] == "cifar100" else 10
        if options["teacher"] == "resnet8":
            options.setdefault("checkpoint", str(teacher_ckpt[classes]))
        if options["dataset"] == "cifar100":
            options.setdefault("data_root", str(cifar_data))
        options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
        key = repr(sorted(options.items())) + f" samples={samples}"
        name = f"{options['dataset']}-{options['augment']}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.zarr"
        if key not in made:
            data = None
            if samples is not None:
                from kdcache.dataset.datasets import build_dataset

                assert options["dataset"] == "digits", "samples= takes the first samples of the built-in digits"
                ds = build_dataset("digits", split=options.get("split", "train"))
                data = type(ds)("digits", ds.split, ds.images[:samples], ds.labels[:samples], 10, ds.norm)
            dump_logits(out=str(base / name), progress=False, data=data, **options)
            made[key] = base / name, _digest(base / name)
        path = made[key][0]
        if copy_to is None:
            return path
        copy = Path(copy_to) / name
        shutil.copytree(path, copy)
        return copy

    yield make
    changed = [str(path) for path, digest in made.values() if _digest(path) != digest]
    assert not changed, f"a test changed a shared cache (use make_cache(..., copy_to=tmp_path)): {changed}"
