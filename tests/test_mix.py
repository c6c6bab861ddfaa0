"""Exact mixup / CutMix views: partner, λ and box from the counter generator, replayed bit-exactly on the student
side."""

import numpy as np
import pytest
import torch
import zarr
from helpers import cli

from kdcache.dataset.datasets import build_dataset
from kdcache.dump.loop import dump_logits
from kdcache.train.trainer import train_student
from kdcache.views.ops import pixel_hash
from kdcache.views.recipes import make_recipe


def _dump(cifar_root, teacher_ckpt, out, mix, batch_size=64, **kw):
    """What ``make_cache(mix=mix, forward_block=16, **kw)`` holds, dumped here in loader batches of ``batch_size``."""
    dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=2,
        out=str(out),
        mix=mix,
        batch_size=batch_size,
        forward_block=16,
        progress=False,
        **kw,
    )
    return zarr.open_group(str(out), mode="r")


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_views_replay_and_compose(cifar_root, teacher_ckpt, make_cache, tmp_path, mix):
    g = zarr.open_group(str(make_cache(mix=mix, forward_block=16)), mode="r")
    ds = build_dataset("cifar100", str(cifar_root), "train")
    recipe, plain = make_recipe("cifar", True, mix), make_recipe("cifar", True)
    params, hashes = g["params"][...], g["view_hash"][...]
    assert list(g["params"].attrs["fields"]) == list(recipe.fields(0))
    partner, lam = recipe.mixing(params.reshape(-1, params.shape[2]))
    samples = np.tile(np.arange(len(ds)), 2)
    assert (partner != samples).all() and len(np.unique(partner)) > len(ds) // 2
    assert ((lam >= 0) & (lam <= 1)).all() and lam.std() > 0.1
    for v in range(2):
        for i in range(0, len(ds), 7):
            p = params[v, i]
            j = recipe.partner_of(p)
            view = recipe.apply(ds.image(i), p, 0, ds.image(j))
            assert pixel_hash(view) == int(hashes[v, i])  # the student rebuilds the teacher's pixels
            a = plain.apply(ds.image(i), plain.params(0, v, i, 0, (32, 32)))
            b = plain.apply(ds.image(j), plain.params(0, v, j, 0, (32, 32)))
            if mix == "mixup":
                want = (float(p[7]) * a.float() + (1 - float(p[7])) * b.float()).round().to(torch.uint8)
            else:
                y0, x0, h, w = (int(x) for x in p[8:12])
                assert p[7] == pytest.approx(1 - h * w / 1024)
                want = a.clone()
                want[:, y0 : y0 + h, x0 : x0 + w] = b[:, y0 : y0 + h, x0 : x0 + w]
            assert torch.equal(view, want)
    other = _dump(cifar_root, teacher_ckpt, tmp_path / "b7.zarr", mix, batch_size=7)
    assert np.array_equal(other["logits"][...], g["logits"][...]) and np.array_equal(other["view_hash"][...], hashes)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_cached_float32_mixed_equals_online(cifar_root, teacher_ckpt, make_cache, tmp_path, mix):
    cache = make_cache(mix=mix, forward_block=16, dtype="float32")
    common = dict(
        student="resnet8",
        dataset="cifar100",
        data_root=str(cifar_root),
        loss="kd",
        epochs=2,
        batch_size=32,
        progress=False,
    )
    a = train_student(out=tmp_path / "cached", cache=str(cache), **common)
    b = train_student(
        out=tmp_path / "online",
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        augment="cifar",
        mix=mix,
        views=2,
        forward_block=16,
        **common,
    )
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    wa = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "online" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = train_student(out=tmp_path / "plain", cache=str(make_cache(dtype="float32")), **common)  # no mixing
    assert plain.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_train_from_mixed_cache_and_refusals(cifar_root, teacher_ckpt, make_cache, tmp_path):
    common = [
        "--cache",
        make_cache(mix="cutmix", forward_block=16, dtype="float32"),
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
        "--verify-views",
    ]
    ok = cli("train-student", *common, "--loss", "kd", "--out", str(tmp_path / "kd"))
    assert ok.returncode == 0, ok.stderr
    dkd = cli("train-student", *common, "--loss", "dkd", "--out", str(tmp_path / "dkd"))
    assert dkd.returncode == 2 and "two target classes" in dkd.stderr
    base = [
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[100]),
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--out",
        str(tmp_path / "bad.zarr"),
        "--mix",
        "mixup",
    ]
    every = cli(*base, "--augment", "cifar", "--views", "all")
    assert every.returncode == 2 and "--mix mixup is continuous" in every.stderr
    mlkd = cli(*base, "--augment", "mlkd", "--views", "2")
    assert mlkd.returncode == 2 and "--augment cifar or imagenet" in mlkd.stderr
    assert not (tmp_path / "bad.zarr").exists()
