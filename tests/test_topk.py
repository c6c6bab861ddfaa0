"""Top-K caches: exact statistics and bucket masses, the store layout, and training from them."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import cli

from kdcache.errors import KdcacheError
from kdcache.losses.functions import dkd_loss, kd_loss, topk_dkd_loss, topk_kd_loss, zscore
from kdcache.store.formats import STAT_FIELDS, LogitFormat, TopKTeacher, buckets, encode, parse_format


def _teacher_batch(
    classes: int = 100, rows: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, classes, generator=g) * 2
    y = torch.randint(0, classes, (rows,), generator=g)
    t[torch.arange(rows)[: rows // 2], y[: rows // 2]] += 6  # half the rows confidently right, half not
    return t, y, torch.randn(rows, classes, generator=g) * 2


def _topk(t: torch.Tensor, y: torch.Tensor, k: int) -> TopKTeacher:
    a = encode(t, y, LogitFormat("topk", k), np.float32)
    return TopKTeacher(
        torch.from_numpy(a["topk_values"]),
        torch.from_numpy(a["topk_indices"]),
        torch.from_numpy(a["row_stats"]),
        t.shape[1],
    )


def test_stats_and_bucket_masses_are_exact_at_t1():
    t, y, s = _teacher_batch()
    tk = _topk(t, y, 5)
    st = dict(zip(STAT_FIELDS, tk.stats.T, strict=True))
    assert torch.allclose(st["mean"], t.mean(1)) and torch.allclose(st["std"], t.std(1))
    assert torch.allclose(st["lse"], torch.logsumexp(t, 1)) and torch.equal(
        st["target"], t.gather(1, y[:, None]).squeeze(1)
    )
    assert torch.equal(tk.values, t.topk(5, dim=1).values)
    _, t_b, slot, _ = buckets(s, tk, y, 1.0)
    p_full, p_b = t.softmax(1), t_b.softmax(1)
    assert torch.allclose(p_b[:, :5], p_full.gather(1, tk.indices.long()), atol=1e-6)
    assert torch.allclose(p_b.gather(1, slot[:, None]).squeeze(1), p_full.gather(1, y[:, None]).squeeze(1), atol=1e-6)
    assert torch.allclose(p_b.sum(1), torch.ones(len(y)), atol=1e-5)
    # Z-scored kept entries equal the Z-scored full row at those classes.
    _, z_b, _, _ = buckets(s, tk, y, 1.0, logit_stand=True)
    assert torch.allclose(z_b[:, :5], zscore(t).gather(1, tk.indices.long()), atol=1e-5)


@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_topk_losses_converge_to_full_as_k_grows(tail):
    t, y, s = _teacher_batch()
    for ls in (False, True):
        full_kd, full_dkd = kd_loss(s, t, 4.0, ls), dkd_loss(s, t, y, 1.0, 8.0, 4.0, ls)
        errors = [abs(float(topk_kd_loss(s, _topk(t, y, k), y, 4.0, ls, tail) - full_kd)) for k in (5, 20, 60, 98)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2 * float(full_kd)
        assert float(topk_dkd_loss(s, _topk(t, y, 98), y, 1.0, 8.0, 4.0, ls, tail)) == pytest.approx(
            float(full_dkd), rel=1e-2
        )


def test_bucket_tail_is_a_lower_bound_and_uniform_tail_is_exact_for_a_flat_tail():
    t, y, s = _teacher_batch()
    for k in (5, 20):
        assert float(topk_kd_loss(s, _topk(t, y, k), y, 1.0)) <= float(kd_loss(s, t, 1.0)) + 1e-6
    flat = torch.full_like(t, -3.0)
    top = torch.randint(0, 100, (len(y), 3))
    flat.scatter_(1, top, torch.tensor([6.0, 4.0, 2.0]).expand(len(y), 3).contiguous())
    flat.scatter_(1, y[:, None], 5.0)
    for ls in (False, True):
        exact = float(kd_loss(s, flat, 4.0, ls))
        assert float(topk_kd_loss(s, _topk(flat, y, 5), y, 4.0, ls, "uniform")) == pytest.approx(exact, rel=1e-4)


def test_topk_loss_has_gradients_and_ctkd_temperature():
    t, y, s = _teacher_batch()
    s = s.clone().requires_grad_(True)
    temp = torch.tensor(3.0, requires_grad=True)
    loss = topk_kd_loss(s, _topk(t, y, 10), y, temp, logit_stand=True)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and temp.grad is not None


def test_parse_format():
    assert parse_format("full") == LogitFormat() and parse_format("topk:10", 100) == LogitFormat("topk", 10)
    for bad in ("topk", "topk:0", "topk:x", "top5"):
        with pytest.raises(KdcacheError, match="--format"):
            parse_format(bad, 100)
    with pytest.raises(KdcacheError, match="at most 8"):
        parse_format("topk:9", 10)


@pytest.fixture
def caches(make_cache) -> tuple[Path, Path]:
    """float32 caches of the same views: full rows, and their top-5."""
    return make_cache(dtype="float32"), make_cache(dtype="float32", format="topk:5")


def test_topk_store_layout_with_plain_zarr(caches):
    full, top = (zarr.open_group(str(p), mode="r") for p in caches)
    assert dict(top.attrs)["format"] == "topk:5" and dict(top.attrs)["kdcache_format"] == 2 and "logits" not in top
    assert top["topk_values"].shape == (2, 96, 5) and top["topk_indices"].dtype == np.int16
    assert list(top["row_stats"].attrs["fields"]) == list(STAT_FIELDS)
    z = torch.from_numpy(full["logits"][...].reshape(-1, 100))
    values, indices = z.topk(5, dim=1)
    assert np.array_equal(top["topk_values"][...].reshape(-1, 5), values.numpy())
    assert np.array_equal(top["topk_indices"][...].reshape(-1, 5), indices.numpy())
    stats = top["row_stats"][...].reshape(-1, 6)
    assert np.allclose(stats[:, 2], torch.logsumexp(z, 1).numpy(), atol=1e-5)
    assert dict(top.attrs)["teacher_top1"] == dict(full.attrs)["teacher_top1"]
    on_disk = [
        sum(f.stat().st_size for f in (p / name).rglob("*") if f.is_file())
        for p, name in ((caches[0], "logits"), (caches[1], "topk_values"))
    ]
    assert on_disk[1] < on_disk[0] / 5


def test_train_from_topk_cli_and_refusals(caches, cifar_root, teacher_ckpt, tmp_path):
    full, top = caches
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
        "train-student",
        "--cache",
        str(top),
        "--loss",
        "dkd",
        "--logit-stand",
        "--out",
        str(tmp_path / "r"),
        *common,
        check=True,
    )
    assert "best-epoch test top-1" in ok.stdout
    bad = cli("train-student", "--cache", str(top), "--loss", "nkd", "--out", str(tmp_path / "r2"), *common)
    assert bad.returncode == 2 and "topk:5 cache" in bad.stderr and "--format full" in bad.stderr
    again = cli(
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        teacher_ckpt[100],
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--augment",
        "cifar",
        "--views",
        "2",
        "--out",
        str(full),
        "--format",
        "topk:x",
    )
    assert again.returncode == 2 and "--format" in again.stderr


def test_format_change_is_refused_on_resume(make_cache, cifar_root, teacher_ckpt, tmp_path):
    full = make_cache(dtype="float32", copy_to=tmp_path)
    before = zarr.open_group(str(full), mode="r")["logits"][...]
    proc = cli(
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[100]),
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--augment",
        "cifar",
        "--views",
        "2",
        "--dtype",
        "float32",
        "--out",
        str(full),
        "--format",
        "topk:5",
    )
    assert proc.returncode == 2 and "format" in proc.stderr and "store has 'full'" in proc.stderr
    assert np.array_equal(zarr.open_group(str(full), mode="r")["logits"][...], before)
