"""`kdcache study views`: one student per number of cached views plus the online reference, resumable."""

import json

import torch
from helpers import cli


def test_study_views_end_to_end(cifar_root, teacher_ckpt, make_cache, tmp_path):
    cache = make_cache(views=4, dtype="float32")
    out = tmp_path / "study"
    args = [
        "study",
        "views",
        "--cache",
        str(cache),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[100]),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(out),
    ]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    study = json.loads((out / "study.json").read_text())
    assert [p["views"] for p in study["points"]] == [1, 2, 4, None]
    assert (out / "views.png").stat().st_size > 1000 and "online" in first.stdout
    # The 4-view point is exactly a plain run from the whole cache; fewer views give a different run (2 epochs of the
    # 4-view cache use two of its views, so at least one other than view 0). Both run in this process, so with the
    # same torch thread settings.
    cli(
        "train-student",
        "--cache",
        str(cache),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(tmp_path / "plain"),
        check=True,
    )
    last = {
        name: json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
        for name in ("views-1", "views-4")
    }
    plain = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
    assert last["views-4"] == plain and last["views-1"] != plain
    w = torch.load(out / "views-4" / "last.pt", weights_only=True)["model"]
    assert all(
        torch.equal(w[k], v) for k, v in torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"].items()
    )
    # A second run reuses every finished point.
    stamp = (out / "views-1" / "last.pt").stat().st_mtime_ns
    again = cli(*args)
    assert again.returncode == 0 and (out / "views-1" / "last.pt").stat().st_mtime_ns == stamp


def test_study_refusals(cifar_root, make_cache, tmp_path):
    cache = make_cache(augment="none", views=1)
    base = [
        "study",
        "views",
        "--cache",
        str(cache),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "s"),
    ]
    proc = cli(*base, "--counts", "1,2")
    assert proc.returncode == 2 and "--counts must lie in 1..1" in proc.stderr
    proc = cli(*base, "--counts", "one")
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr
