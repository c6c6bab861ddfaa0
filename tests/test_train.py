import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import assert_same_arrays, cli, run_cli

from kdcache.dump.loop import dump_logits
from kdcache.errors import KdcacheError
from kdcache.experiments.quickstart import results_table
from kdcache.experiments.report import Report, Row, RunResult
from kdcache.train.trainer import TrainResult, train_student

COMMON = dict(student="resnet8", dataset="cifar100", epochs=2, batch_size=32, progress=False)


@pytest.fixture
def cache32(make_cache) -> Path:
    """The session's float32 cache of two cifar views: shared, so read it only."""
    return make_cache(dtype="float32")


@pytest.fixture
def own_cache32(make_cache, tmp_path) -> Path:
    """A copy of :func:`cache32` of this test's own, which it may damage."""
    return make_cache(dtype="float32", copy_to=tmp_path)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("loss,ls", [("kd", True), ("dkd", False)])
def test_cached_float32_equals_online_teacher(cifar_root, teacher_ckpt, cache32, tmp_path, loss, ls):
    a = train_student(
        out=tmp_path / "cached", cache=str(cache32), data_root=str(cifar_root), loss=loss, logit_stand=ls, **COMMON
    )
    b = train_student(
        out=tmp_path / "online",
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        augment="cifar",
        views=2,
        data_root=str(cifar_root),
        loss=loss,
        logit_stand=ls,
        **COMMON,
    )
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    wa, wb = _weights(tmp_path / "cached" / "last.pt"), _weights(tmp_path / "online" / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train_student(out=tmp_path / "ce", data_root=str(cifar_root), loss="ce", **COMMON)
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


_GPU_SETTINGS_RUN = """
import sys
import torch
from kdcache.dump.loop import dump_logits
from kdcache.devices import deterministic_cuda
from kdcache.train.trainer import train_student
deterministic_cuda()
assert torch.are_deterministic_algorithms_enabled() and not torch.utils.deterministic.fill_uninitialized_memory
root, ckpt, out, fill = sys.argv[1:]
torch.utils.deterministic.fill_uninitialized_memory = fill == "on"
dump_logits(teacher="resnet8", checkpoint=ckpt, dataset="cifar100", data_root=root, augment="mlkd", views=2,
            out=out + "/c.zarr", dtype="float32", batch_size=7, workers=2, progress=False)
train_student(out=out + "/run", cache=out + "/c.zarr", data_root=root, loss="mlkd", logit_stand=True,
              student="resnet8", dataset="cifar100", epochs=2, batch_size=32, progress=False)
"""


@pytest.mark.slow
def test_nothing_reads_uninitialized_memory(cifar_root, teacher_ckpt, tmp_path):
    """On a GPU kdcache runs deterministic mode with its NaN fill of new tensors off (the fill stalls busy hosts), which
    is only safe if no step reads memory it did not write. With the fill on, such a read brings NaN into the logits or
    the student: a dump and a student run under it must equal those without it bit for bit. Both run in fresh
    processes with the same environment (thread counts change a CPU student's last bits)."""
    runs = {}
    for fill in ("on", "off"):
        runs[fill] = tmp_path / fill
        runs[fill].mkdir()
        subprocess.run(
            [sys.executable, "-c", _GPU_SETTINGS_RUN, str(cifar_root), str(teacher_ckpt[100]), str(runs[fill]), fill],
            check=True,
        )
    assert_same_arrays(runs["on"] / "c.zarr", runs["off"] / "c.zarr")
    assert np.isfinite(zarr.open_group(str(runs["on"] / "c.zarr"))["logits"][...]).all()
    wa, wb = _weights(runs["on"] / "run" / "last.pt"), _weights(runs["off"] / "run" / "last.pt")
    assert all(torch.isfinite(w).all() for w in wa.values() if w.is_floating_point())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_float16_cache_is_within_rounding(cifar_root, make_cache, cache32, tmp_path):
    out16 = make_cache()  # float16
    z16 = zarr.open_group(str(out16))["logits"][...].astype(np.float32)
    z32 = zarr.open_group(str(cache32))["logits"][...]
    assert np.abs(z16 - z32).max() <= np.abs(z32).max() * 2**-10
    a = train_student(out=tmp_path / "a", cache=str(cache32), data_root=str(cifar_root), loss="kd", **COMMON)
    b = train_student(out=tmp_path / "b", cache=str(out16), data_root=str(cifar_root), loss="kd", **COMMON)
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-3)


def test_metrics_checkpoints_and_plot(cifar_root, cache32, tmp_path):
    out = tmp_path / "run"
    proc = cli(
        "train-student",
        "--cache",
        str(cache32),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--loss",
        "kd",
        "--logit-stand",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--plot",
        check=True,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    best = max(rows, key=lambda r: r["test_top1"])  # the first epoch at the maximum, as best.pt
    assert proc.stdout.strip().splitlines()[-1] == (
        f"last-epoch test top-1 {rows[-1]['test_top1']:.2f}% (epoch 2)  "
        f"best-epoch test top-1 {best['test_top1']:.2f}% (epoch {best['epoch']})  -> {out}"
    )
    for key in ("epoch", "lr", "train_loss", "test_top1", "test_top5", "test_nll", "test_ece", "seconds"):
        assert key in rows[0]
    assert 0 <= rows[0]["test_ece"] <= 1 and rows[0]["test_top5"] >= rows[0]["test_top1"]
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert "model" in ckpt and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    again = cli(
        "train-student",
        "--cache",
        str(cache32),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--epochs",
        "2",
        "--out",
        str(out),
    )
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(cifar_root, cache32, tmp_path):
    args = [
        "train-student",
        "--cache",
        str(cache32),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--loss",
        "kd",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--lr-milestones",
        "2,3",
    ]
    run_cli(*args, "--out", str(tmp_path / "full"), check=True)
    stalled = Path(__file__).with_name("stalled_train.py")  # stalls in epoch 2's evaluation until killed
    proc = subprocess.Popen(
        [sys.executable, str(stalled), *args, "--out", str(tmp_path / "cut")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600  # a stalled run waits to be stopped: only a hang takes this long
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_cli(*args, "--out", str(tmp_path / "cut"), "--resume", check=True)
    full, cut = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_cache_of_other_data_is_refused(cache32, tmp_path):
    with pytest.raises(KdcacheError, match="made for other data: dataset name is 'cifar100' there, 'digits' here"):
        train_student(
            out=tmp_path / "x", cache=str(cache32), student="resnet8", dataset="digits", loss="kd", progress=False
        )


def test_recipe_mismatch_and_missing_teacher(cifar_root, cache32, tmp_path):
    with pytest.raises(KdcacheError, match="holds --augment cifar views, not mlkd"):
        train_student(out=tmp_path / "x", cache=str(cache32), augment="mlkd", data_root=str(cifar_root), **COMMON)
    with pytest.raises(KdcacheError, match="needs a teacher signal"):
        train_student(out=tmp_path / "y", data_root=str(cifar_root), loss="kd", **COMMON)
    with pytest.raises(KdcacheError, match="--epochs must be at least 1, got -1"):
        train_student(out=tmp_path / "z", data_root=str(cifar_root), loss="ce", **{**COMMON, "epochs": -1})


def test_pixel_hash_mismatch_stops_training(cifar_root, own_cache32, tmp_path):
    cache32 = own_cache32
    g = zarr.open_group(str(cache32), mode="r+")
    h = g["view_hash"][...]
    h[:, :] ^= np.uint64(1)
    g["view_hash"][...] = h
    with pytest.raises(KdcacheError, match="does not rebuild the teacher's pixels"):
        train_student(out=tmp_path / "x", cache=str(cache32), data_root=str(cifar_root), loss="kd", **COMMON)


def test_mlkd_trains_from_an_mlkd_cache(cifar_root, make_cache, tmp_path):
    out = make_cache(augment="mlkd")
    r = train_student(
        out=tmp_path / "r",
        cache=str(out),
        data_root=str(cifar_root),
        loss="mlkd",
        logit_stand=True,
        verify_views=True,
        **COMMON,
    )
    assert len(r.history) == 2 and np.isfinite(r.history[-1]["train_loss"])


@pytest.mark.parametrize(
    "extra",
    [
        dict(loss="nkd"),
        dict(loss="normkd"),
        dict(loss="normkd", logit_stand=True),
        dict(loss="kd", teacher_fix="sort", logit_stand=True),
        dict(loss="dkd", teacher_fix="sort"),
        dict(loss="kd", ctkd=True, logit_stand=True),
        dict(loss="normkd-dkd"),
    ],
)
def test_sibling_methods_train_from_one_cache(cifar_root, cache32, tmp_path, extra):
    r = train_student(out=tmp_path / "r", cache=str(cache32), data_root=str(cifar_root), **{**COMMON, **extra})
    assert len(r.history) == 2 and all(np.isfinite(h["train_loss"]) for h in r.history)
    if extra.get("ctkd"):
        temps = [h["temperature"] for h in r.history]
        assert all(1.0 < t < 21.0 for t in temps)
    with pytest.raises(KdcacheError, match="--ctkd works with --loss kd or dkd"):
        train_student(
            out=tmp_path / "x", cache=str(cache32), data_root=str(cifar_root), **{**COMMON, "loss": "nkd", "ctkd": True}
        )


def test_ctkd_with_dkd_learns_its_temperature_from_epoch_one(cifar_root, cache32, tmp_path):
    run = {**COMMON, "loss": "dkd", "ctkd": True, "warmup": 0, "ctkd_decay_epochs": 1, "lr_milestones": (150,)}
    kw = dict(cache=str(cache32), data_root=str(cifar_root), **run)
    learned = train_student(out=tmp_path / "a", **kw)
    frozen = train_student(out=tmp_path / "b", ctkd_decay_min=0.0, **kw)  # λ ≡ 0: only weight decay moves θ
    t_learned, t_frozen = ([h["temperature"] for h in r.history] for r in (learned, frozen))
    assert all(np.isfinite(h["train_loss"]) for h in learned.history)
    assert t_learned[-1] != pytest.approx(1 + 20 * torch.sigmoid(torch.tensor(1.0)).item(), abs=1e-4)
    # With a 1-epoch curriculum λ(1) = −1 acts in epoch 1 (upstream's 1-based epoch): the DKD gradient reaches θ.
    assert abs(t_learned[0] - t_frozen[0]) > 1e-4
    with pytest.raises(KdcacheError, match="--ctkd-decay"):
        train_student(out=tmp_path / "c", ctkd_decay="step", **kw)


def test_summaries_report_last_and_best_epoch():
    hist = [
        {"epoch": 1, "test_top1": 60.0, "test_nll": 1.0, "test_ece": 0.2, "seconds": 2.0},
        {"epoch": 2, "test_top1": 60.0, "test_nll": 1.1, "test_ece": 0.1, "seconds": 2.5},
        {"epoch": 3, "test_top1": 55.5, "test_nll": 1.2, "test_ece": 0.05, "seconds": 3.0},
    ]
    assert TrainResult(Path("run"), 60.0, hist[-1], hist).best_epoch == 1
    other = [{**h, "test_top1": h["test_top1"] + 1.0} for h in hist]
    runs = [RunResult("kd", {}, "default", s, None, 3, hs, Path(f"s{s}")) for s, hs in enumerate([hist, other])]
    report = Report([Row("kd", "default", {}, None, runs)], runs, 0, Path("a"), Path("b"), Path("c"))
    table = results_table(report, hist, identical=True).splitlines()
    assert table[0] == "| method | n | last-epoch top-1 (%) | best-epoch top-1 (%) | NLL | ECE | train time (s) |"
    assert table[2] == "| teacher (CE, 3 epochs) | 1 | 55.50 | 60.00 | 1.200 | 0.050 | 7.5 |"
    assert table[3] == "| KD (cache) | 2 | 56.00 ± 0.71 | 60.50 ± 0.71 | 1.200 | 0.050 | 7.5 |"
    assert "bit-identical in every seed" in table[-1]


def test_fsspec_url_stores_work_like_local_ones(cifar_root, teacher_ckpt, cache32, tmp_path):
    url = f"memory://kdcache-test/{tmp_path.name}/c.zarr"
    dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=2,
        out=url,
        dtype="float32",
        progress=False,
    )
    assert np.array_equal(
        zarr.open_group(url, mode="r")["logits"][...], zarr.open_group(str(cache32), mode="r")["logits"][...]
    )
    a = train_student(out=tmp_path / "url", cache=url, data_root=str(cifar_root), loss="kd", **COMMON)
    b = train_student(out=tmp_path / "local", cache=str(cache32), data_root=str(cifar_root), loss="kd", **COMMON)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_corrupt_chunk_stops_training_naming_it(cifar_root, own_cache32, tmp_path):
    cache32 = own_cache32
    chunk = cache32 / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(KdcacheError, match="array logits, view 1, chunk 0 is corrupt"):
        train_student(out=tmp_path / "x", cache=str(cache32), data_root=str(cifar_root), loss="kd", **COMMON)


def test_cache_of_another_split_and_nonsense_numbers_via_cli(cifar_root, make_cache, tmp_path):
    test_cache = make_cache(split="test", views=1)
    base = [
        "train-student",
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--out",
        str(tmp_path / "r"),
    ]
    proc = cli(*base, "--cache", str(test_cache))
    assert proc.returncode == 2 and "dataset split is 'test' there, 'train' here" in proc.stderr
    for flag, value, rule in (
        ("--epochs", "-3", "must be at least 1, got -3"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--temperature", "0", "must be positive, got 0.0"),
        ("--seed", str(2**64), "must be in 0 .. 2**64 - 1"),
    ):
        proc = cli(*base, "--loss", "ce", flag, value)
        assert proc.returncode == 2 and f"{flag} {rule}" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r" / "last.pt").exists()


def test_resume_keeps_a_legacy_runs_view_schedule_and_names_a_changed_setting(cifar_root, cache32, tmp_path):
    from kdcache.train.trainer import train_student

    kw = dict(
        cache=str(cache32),
        student="resnet8",
        dataset="cifar100",
        data_root=str(cifar_root),
        batch_size=16,
        lr_milestones=(5,),
        progress=False,
        out=str(tmp_path / "run"),
    )
    train_student(epochs=1, **kw)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["config"]["view_schedule"] == "chunk"
    for key in ("view_schedule", "ctkd_decay", "ctkd_decay_epochs", "ctkd_decay_max", "ctkd_decay_min"):
        del state["config"][key]  # a run folder as kdcache wrote them before these settings existed
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(KdcacheError, match=r"lr: run has 0.05, this command 0.1\)"):
        train_student(epochs=2, resume=True, lr=0.1, **kw)
    train_student(epochs=2, resume=True, **kw)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["view_schedule"] == "sample"
    with pytest.raises(KdcacheError, match=r"view_schedule: run has 'sample', this command 'chunk'"):
        train_student(epochs=3, resume=True, view_schedule="chunk", **kw)


def test_missing_chunk_is_refused_before_training_naming_it(cifar_root, own_cache32, tmp_path):
    cache32 = own_cache32
    (cache32 / "logits" / "c" / "1" / "0" / "0").unlink()  # marked done, but the file is gone
    proc = cli(
        "train-student",
        "--cache",
        str(cache32),
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_root),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "x"),
    )
    assert proc.returncode == 2 and "array logits, view 1, chunk 0 has no data although marked done" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "x" / "metrics.jsonl").exists()


def test_non_finite_teacher_row_stops_the_feed_naming_view_and_sample(own_cache32):
    from kdcache.feed.logits import LogitFeed
    from kdcache.store.cache import open_store

    store = open_store(own_cache32, "r+")
    store.group["logits"][1, 5, 3] = np.nan
    views = np.ones(store.num_samples, np.int64)
    for memory in (1 << 30, 0):  # whole cache in RAM, and streamed chunks
        with pytest.raises(KdcacheError, match="logits of sample 5, view 1 is not finite"):
            LogitFeed(store, ["logits"], memory).get(0, views)
    assert LogitFeed(store, ["logits"], 0).get(0, np.zeros_like(views))["logits"].shape[0] == store.num_samples


@pytest.mark.parametrize("case", ["out-is-a-file", "out-inside-a-cache", "plot-unwritable", "empty-checkpoint"])
def test_outputs_and_inputs_that_must_not_be_used(cifar_root, cache32, tmp_path, case):
    (tmp_path / "a-file").write_text("a user's file")
    (tmp_path / "empty.pth").write_bytes(b"")
    before = {p: p.read_bytes() for p in sorted(cache32.rglob("*")) if p.is_file()}
    args, needle = {
        "out-is-a-file": (["train-student", "--out", str(tmp_path / "a-file")], "is a file: give a folder path"),
        "out-inside-a-cache": (["train-student", "--out", str(cache32 / "run")], "is inside the cache store"),
        "plot-unwritable": (["inspect", str(cache32), "--plot", "/proc/kdcache/none.png"], "cannot write the plot"),
        "empty-checkpoint": (
            [
                "verify",
                str(cache32),
                "--teacher",
                "resnet8",
                "--checkpoint",
                str(tmp_path / "empty.pth"),
                "--sample",
                "2",
                "--data-root",
                str(cifar_root),
            ],
            "cannot read checkpoint",
        ),
    }[case]
    if args[0] == "train-student":
        args += [
            "--cache",
            str(cache32),
            "--student",
            "resnet8",
            "--dataset",
            "cifar100",
            "--data-root",
            str(cifar_root),
            "--epochs",
            "1",
        ]
    proc = cli(*args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert (tmp_path / "a-file").read_text() == "a user's file"
    assert {p: p.read_bytes() for p in sorted(cache32.rglob("*")) if p.is_file()} == before
