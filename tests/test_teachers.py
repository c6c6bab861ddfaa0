"""Several teachers on one view index: mixing, refusals, and per-view agreement."""

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from kdcache.dump.loop import dump_logits
from kdcache.feed.batches import ensemble_teachers
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model
from kdcache.store.inspection import teacher_agreement
from kdcache.train.trainer import train_student

COMMON = dict(student="resnet8", dataset="cifar100", epochs=1, batch_size=32, progress=False)


@pytest.fixture
def two_caches(cifar_root, teacher_ckpt, tmp_path) -> tuple[Path, Path]:
    torch.manual_seed(123)
    second = tmp_path / "second.pth"
    save_checkpoint(second, create_model("resnet8", 100))
    kw = dict(
        teacher="resnet8",
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=2,
        dtype="float32",
        progress=False,
    )
    dump_logits(checkpoint=str(teacher_ckpt[100]), out=str(tmp_path / "a.zarr"), **kw)
    dump_logits(checkpoint=str(second), out=str(tmp_path / "b.zarr"), **kw)
    return tmp_path / "a.zarr", tmp_path / "b.zarr"


def test_ensemble_teachers_modes():
    a, b = torch.randn(8, 10), torch.randn(8, 10) * 3
    assert torch.allclose(ensemble_teachers([a, b], [0.25, 0.75], "logits"), 0.25 * a + 0.75 * b)
    mixed = ensemble_teachers([a, b], [1.0, 3.0], "probs").softmax(1)
    assert torch.allclose(mixed, 0.25 * a.softmax(1) + 0.75 * b.softmax(1), atol=1e-6)


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_weights_pick_teachers(two_caches, cifar_root, tmp_path):
    a, b = (str(p) for p in two_caches)
    single = train_student(out=tmp_path / "a", cache=a, data_root=str(cifar_root), **COMMON)
    only_a = train_student(
        out=tmp_path / "a0", cache=[a, b], teacher_weights="1,0", data_root=str(cifar_root), **COMMON
    )
    mixed = train_student(
        out=tmp_path / "ab", cache=[a, b], teacher_weights=[0.5, 0.5], data_root=str(cifar_root), **COMMON
    )
    assert only_a.history[0]["train_loss"] == single.history[0]["train_loss"]
    wa, w0 = _last_weights(tmp_path / "a"), _last_weights(tmp_path / "a0")
    assert all(torch.equal(wa[k], w0[k]) for k in wa)
    assert mixed.history[0]["train_loss"] != single.history[0]["train_loss"]


def test_cli_mix_and_refusals(two_caches, cifar_root, teacher_ckpt, tmp_path):
    a, b = (str(p) for p in two_caches)
    common = [
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--epochs",
        "1",
        "--batch-size",
        "32",
    ]
    ok = run_cli(
        "train-student", "--cache", a, "--cache", b, "--teacher-mix", "probs", "--out", str(tmp_path / "p"), *common
    )
    assert ok.returncode == 0, ok.stderr
    wrong = run_cli(
        "train-student", "--cache", a, "--cache", b, "--teacher-weights", "0.5", "--out", str(tmp_path / "w"), *common
    )
    assert wrong.returncode == 2 and "2 non-negative numbers" in wrong.stderr
    name = run_cli(
        "train-student",
        "--cache",
        a,
        "--cache",
        b,
        "--teacher-weights",
        "IMAGENET1K_V1",
        "--out",
        str(tmp_path / "n"),
        *common,
    )
    assert name.returncode == 2 and "--weights" in name.stderr
    other = tmp_path / "seed1.zarr"
    dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=2,
        dtype="float32",
        seed=1,
        out=str(other),
        progress=False,
    )
    refused = run_cli("train-student", "--cache", a, "--cache", str(other), "--out", str(tmp_path / "s"), *common)
    assert refused.returncode == 2 and "do not hold the same views: seed differs" in refused.stderr
    assert not (tmp_path / "s" / "last.pt").exists()
    fewer = tmp_path / "one.zarr"
    dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=1,
        dtype="float32",
        out=str(fewer),
        progress=False,
    )
    refused = run_cli("train-student", "--cache", a, "--cache", str(fewer), "--out", str(tmp_path / "f"), *common)
    assert refused.returncode == 2 and "--views 2" in refused.stderr


def test_inspect_agreement(two_caches, tmp_path):
    a, b = (str(p) for p in two_caches)
    same = teacher_agreement([a, a])
    assert same.agree == [1.0, 1.0] and max(same.js) < 1e-12
    pair = teacher_agreement([a, b])
    assert all(0 <= x < 1 for x in pair.agree) and min(pair.js) > 0 and len(pair.top1) == 2
    png = tmp_path / "agree.png"
    proc = run_cli("inspect", a, b, "--plot", str(png))
    assert proc.returncode == 0 and "all agree" in proc.stdout and png.stat().st_size > 1000
