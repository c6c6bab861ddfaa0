"""The examples/ scripts run as a user runs them, on the session's cache of the tiny CIFAR-100 folder (96 samples, so
an epoch takes a moment): they train, print an epoch line and compute what they claim to, from the teacher rows the
cache holds for the views they train on."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import cli
from scipy.spatial.distance import jensenshannon

import kdcache
from kdcache.models.factory import create_model
from kdcache.store.cache import open_store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@pytest.fixture
def cache(make_cache) -> Path:
    """The train split's teacher logits: a seeded resnet8 with non-trivial BN statistics, 2 cifar views."""
    return make_cache()


@pytest.fixture
def data(cifar_data) -> list[str]:
    """The flags that name the cache's dataset."""
    return ["--dataset", "cifar100", "--data-root", str(cifar_data)]


def load_example(name: str) -> ModuleType:
    """An example script imported as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(script: str, *args: str) -> list[dict[str, float]]:
    """``python examples/SCRIPT ARGS`` from the repository root; its ``epoch N key value ...`` lines, parsed."""
    proc = subprocess.run(
        [sys.executable, f"examples/{script}", *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    rows = [{k: float(v) for k, v in zip(words[::2], words[1::2], strict=True)} for words in lines]
    for row in rows:
        assert 0.0 <= row["test_top1"] <= 100.0 and all(math.isfinite(v) for v in row.values())
    return rows


def test_own_loop_trains_on_the_cached_rows_of_its_views(cache: Path, data: list[str], tmp_path: Path):
    # lr 0 keeps the seeded student fixed (train-mode BN uses batch statistics), so the epoch's mean loss can be
    # recomputed here: CE plus reverse KL against the store's rows of the views the epoch schedules.
    out = tmp_path / "student.pt"
    (row,) = run_example("own_loop.py", "--cache", str(cache), *data, "--epochs", "1", "--lr", "0", "--out", str(out))
    assert row["epoch"] == 1 and out.is_file()

    logits = np.asarray(open_store(cache).group["logits"][...])
    loader = kdcache.DistillLoader(cache, "cifar100", data_root=data[-1], batch_size=64, seed=0, epochs=1)
    views = loader.epoch_views(0)
    torch.manual_seed(0)
    student = create_model("resnet8", 100).train()
    total, seen = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            ids = batch.ids.numpy()
            rows = torch.from_numpy(logits[views[ids], ids]).float()
            assert torch.equal(batch.teacher[0], rows)
            z = student(batch.views[0])
            log_s, log_t = F.log_softmax(z / 4, dim=1), F.log_softmax(rows / 4, dim=1)
            reverse_kl = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean") * 16
            total += float(F.cross_entropy(z, batch.labels) + reverse_kl) * len(ids)
            seen += len(ids)
    loader.close()
    assert seen == len(loader.dataset)
    assert row["train_loss"] == pytest.approx(total / seen, rel=1e-4)


@needs_timm
def test_timm_student_trains_with_a_registered_loss(cache: Path, data: list[str]):
    # Not the example's default timm model: the flag takes any timm name (this one is quick on a slow CPU).
    args = ["--student", "timm.test_resnet", "--loss", "dkd", "--epochs", "1"]
    (row,) = run_example("timm_student.py", "--cache", str(cache), *data, *args)
    assert row["epoch"] == 1 and row["train_loss"] > 0


def test_mdistiller_kd_keeps_mdistillers_loss_with_cached_teacher_logits(cache: Path, data: list[str]):
    module = load_example("mdistiller_distiller")
    cfg = SimpleNamespace(KD=SimpleNamespace(TEMPERATURE=4.0, LOSS=SimpleNamespace(CE_WEIGHT=0.1, KD_WEIGHT=0.9)))
    torch.manual_seed(0)
    distiller = module.KD(create_model("resnet8", 10), cfg).train()
    image, target, teacher = torch.randn(8, 3, 32, 32), torch.arange(8) % 10, 3 * torch.randn(8, 10)
    preds, losses = distiller(image=image, target=target, epoch=1, teacher_logits=teacher)
    # mdistiller's kd_loss, as KD.py writes it
    kl = F.kl_div(F.log_softmax(preds / 4, dim=1), F.softmax(teacher / 4, dim=1), reduction="none").sum(1).mean()
    assert set(losses) == {"loss_ce", "loss_kd"}
    assert torch.allclose(losses["loss_ce"], 0.1 * F.cross_entropy(preds, target))
    assert torch.allclose(losses["loss_kd"], 0.9 * kl * 16, rtol=1e-5)
    assert distiller.get_learnable_parameters() == list(distiller.student.parameters())
    assert torch.equal(distiller.eval()(image=image), distiller.student(image))

    (row,) = run_example("mdistiller_distiller.py", "--cache", str(cache), *data, "--epochs", "1")
    assert row["epoch"] == 1 and row["loss_ce"] > 0 and row["loss_kd"] > 0


def test_my_loss_is_a_jensen_shannon_divergence():
    js = load_example("my_loss").js_divergence
    s, t, labels = torch.randn(6, 10), 2 * torch.randn(6, 10), torch.zeros(6, dtype=torch.long)
    for temperature in (1.0, 2.5):
        p, q = F.softmax(s / temperature, dim=1).numpy(), F.softmax(t / temperature, dim=1).numpy()
        expected = np.mean(jensenshannon(p, q, axis=1) ** 2)
        assert float(js(s, t, labels, temperature=temperature)) == pytest.approx(expected, rel=1e-4)
    assert float(js(s, s, labels)) == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    assert float(js(disjoint, disjoint.flip(1), labels[:2])) == pytest.approx(math.log(2), rel=1e-5)


def test_my_loss_trains_through_the_cli(cache: Path, data: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as PYTHONPATH=examples puts it on a user's path
    out = tmp_path / "run"
    cli(
        "train-student", "--cache", str(cache), *data, "--student", "resnet8",
        "--loss", "my_loss:js_divergence", "--loss-opt", "temperature=2", "--epochs", "1", "--batch-size", "64",
        "--device", "cpu", "--out", str(out), check=True, cwd=ROOT,
    )  # fmt: skip
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < row["train_kd"] <= math.log(2)
    assert row["train_loss"] == pytest.approx(row["train_ce"] + row["train_kd"], rel=1e-6)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["loss"] == "my_loss:js_divergence" and config["loss-opt"] == {"temperature": 2}
