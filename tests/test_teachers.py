"""Several teachers on one view index: mixing, refusals, and per-view agreement."""

from pathlib import Path

import pytest
import torch
from helpers import cli

from kdcache.feed.batches import ensemble_teachers
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model
from kdcache.store.inspection import teacher_agreement
from kdcache.train.trainer import train_student

COMMON = dict(student="resnet8", dataset="cifar100", epochs=1, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> Path:
    """Another resnet8 teacher (other seeded weights)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("second") / "second.pth"
    save_checkpoint(path, create_model("resnet8", 100))
    return path


@pytest.fixture
def two_caches(make_cache, second_teacher) -> tuple[Path, Path]:
    """float32 caches of the same two views from two teachers."""
    return make_cache(dtype="float32"), make_cache(dtype="float32", checkpoint=second_teacher)


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
    only_a = train_student(out=tmp_path / "a0", cache=[a, b], cache_weights="1,0", data_root=str(cifar_root), **COMMON)
    mixed = train_student(
        out=tmp_path / "ab", cache=[a, b], cache_weights=[0.5, 0.5], data_root=str(cifar_root), **COMMON
    )
    assert only_a.history[0]["train_loss"] == single.history[0]["train_loss"]
    wa, w0 = _last_weights(tmp_path / "a"), _last_weights(tmp_path / "a0")
    assert all(torch.equal(wa[k], w0[k]) for k in wa)
    assert mixed.history[0]["train_loss"] != single.history[0]["train_loss"]


def test_cli_mix_and_refusals(two_caches, cifar_root, make_cache, tmp_path):
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
    ok = cli(
        "train-student", "--cache", a, "--cache", b, "--teacher-mix", "probs", "--out", str(tmp_path / "p"), *common
    )
    assert ok.returncode == 0, ok.stderr
    wrong = cli(
        "train-student", "--cache", a, "--cache", b, "--cache-weights", "0.5", "--out", str(tmp_path / "w"), *common
    )
    assert wrong.returncode == 2 and "2 non-negative numbers" in wrong.stderr
    name = cli(
        "train-student",
        "--cache",
        a,
        "--cache",
        b,
        "--cache-weights",
        "IMAGENET1K_V1",
        "--out",
        str(tmp_path / "n"),
        *common,
    )
    assert name.returncode == 2 and "--weights" in name.stderr
    other = make_cache(dtype="float32", view_seed=1)
    refused = cli("train-student", "--cache", a, "--cache", str(other), "--out", str(tmp_path / "s"), *common)
    assert refused.returncode == 2 and "do not hold the same views: seed differs" in refused.stderr
    assert not (tmp_path / "s" / "last.pt").exists()
    fewer = make_cache(dtype="float32", views=1)
    refused = cli("train-student", "--cache", a, "--cache", str(fewer), "--out", str(tmp_path / "f"), *common)
    assert refused.returncode == 2 and "--views 2" in refused.stderr


def test_inspect_agreement(two_caches, tmp_path):
    a, b = (str(p) for p in two_caches)
    same = teacher_agreement([a, a])
    assert same.agree == [1.0, 1.0] and max(same.js) < 1e-12
    pair = teacher_agreement([a, b])
    assert all(0 <= x < 1 for x in pair.agree) and min(pair.js) > 0 and len(pair.top1) == 2
    png = tmp_path / "agree.png"
    proc = cli("inspect", a, b, "--plot", png)
    assert proc.returncode == 0 and "all agree" in proc.stdout and png.stat().st_size > 1000
