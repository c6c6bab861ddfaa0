"""The sweep report (summary.csv, results.md, curves.png) on fake sweep folders, and the ls-cifar100 preset."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import re
import statistics
from importlib.resources import files
from pathlib import Path

import matplotlib.image
import pytest
from helpers import LS_METHODS, LS_PAIRS

from kdcache.errors import KdcacheError
from kdcache.experiments.report import collect_runs, write_report
from kdcache.models.factory import list_models
from kdcache.settings.files import parse_settings, read_yaml
from kdcache.train.config import TrainConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(epoch: int, top1: float, seconds: float = 10.0) -> dict:
    """One metrics.jsonl line as train-student writes it."""
    return {
        "epoch": epoch,
        "lr": 0.05,
        "train_loss": 2.0 / epoch,
        "train_ce": 1.0 / epoch,
        "train_kd": 1.0 / epoch,
        "test_top1": top1,
        "test_top5": top1 + 20.0,
        "test_nll": 3.0 / epoch,
        "test_ece": 0.01 * epoch,
        "seconds": seconds + epoch,
    }


def _write_run(root: Path, method: str, grid: dict, point: str, seed: int, top1: list[float], **kw) -> Path:
    """A run folder of a sweep: run.json, and metrics.jsonl with one line per value of ``top1`` (+ ``tail``)."""
    folder = root / "runs" / method / point / f"seed-{seed}"
    folder.mkdir(parents=True)
    meta = {"method": method, "grid": grid, "point": point, "seed": seed, "epochs": kw.get("epochs", 3)}
    (folder / "run.json").write_text(json.dumps({**meta, "reference": kw.get("reference")}))
    lines = [json.dumps(_record(i + 1, x, 10.0 * seed)) + "\n" for i, x in enumerate(top1)]
    (folder / "metrics.jsonl").write_text("".join(lines) + kw.get("tail", ""))
    return folder


def _fake_sweep(root: Path) -> Path:
    """Two methods x two grid points x three seeds, plus unfinished runs and torn files."""
    top1 = {  # (method, temperature) -> per seed, test top-1 per epoch
        ("kd", 2): [[40.0, 70.0, 70.89], [41.0, 72.5, 71.31], [39.0, 71.0, 71.73]],
        ("kd", 4): [[42.0, 69.0, 68.5], [43.0, 68.0, 69.25], [44.0, 70.0, 69.0]],
        ("dkd+ls", 2): [[50.0, 75.0, 74.0], [51.0, 74.0, 74.75], [49.5, 76.0, 75.5]],
        ("dkd+ls", 4): [[48.0, 73.0, 73.5], [47.0, 74.5, 74.0], [46.0, 72.0, 73.25]],
    }
    reference = {("kd", 2): 70.0, ("kd", 4): 72.0}
    for (method, t), seeds in top1.items():
        for seed, values in enumerate(seeds):
            tail = '{"epoch": 4, "lr": 0.0' if (method, t, seed) == ("dkd+ls", 2, 2) else ""
            args = (root, method, {"temperature": t}, f"temperature-{t}", seed, values)
            _write_run(*args, reference=reference.get((method, t)), tail=tail)
    _write_run(root, "kd", {"temperature": 4}, "temperature-4", 3, [45.0, 46.0])  # stopped early
    _write_run(root, "dkd+ls", {"temperature": 4}, "temperature-4", 3, [45.0, 46.0], tail='{"epoch": 3, "te')
    torn = root / "runs" / "kd" / "temperature-2" / "seed-3"
    torn.mkdir()
    (torn / "run.json").write_text('{"method": "kd", "gri')  # being written
    return root


def _history(folder: Path) -> list[dict]:
    """metrics.jsonl read independently of kdcache: complete JSON lines only."""
    out = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _expected(root: Path) -> dict[tuple[str, int], list[list[dict]]]:
    """(method, temperature) -> histories of the finished runs, by seed, from the files themselves."""
    groups: dict[tuple[str, int], list[list[dict]]] = {}
    for meta_path in sorted(root.glob("runs/*/*/seed-*/run.json"), key=lambda p: int(p.parent.name[5:])):
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            continue
        hist = _history(meta_path.parent)
        if hist and hist[-1]["epoch"] >= meta["epochs"]:
            groups.setdefault((meta["method"], meta["grid"]["temperature"]), []).append(hist)
    return groups


def _pm(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _table(md: str) -> dict[tuple[str, str], list[str]]:
    """results.md table rows keyed by (method, temperature cell)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[2:]
    assert header[:3] == ["method", "temperature", "n"]
    return {(r[0], r[1]): r for r in body}


def test_summary_csv_rows_match_the_metrics_files(tmp_path):
    root = _fake_sweep(tmp_path / "sweep")
    report = write_report(root)
    rows = list(csv.DictReader(report.summary_csv.open()))
    assert list(rows[0]) == [
        "method", "temperature", "seed", "last_top1", "best_top1", "best_epoch", "top5", "nll", "ece", "train_seconds"
    ]  # fmt: skip
    assert [(r["method"], r["temperature"], r["seed"]) for r in rows] == [
        (m, str(t), str(s)) for m in ("dkd+ls", "kd") for t in (2, 4) for s in range(3)
    ]
    expected = _expected(root)
    for r in rows:
        hist = expected[(r["method"], int(r["temperature"]))][int(r["seed"])]
        top1 = [h["test_top1"] for h in hist]
        assert float(r["last_top1"]) == top1[-1] and float(r["best_top1"]) == max(top1)
        assert int(r["best_epoch"]) == hist[top1.index(max(top1))]["epoch"]
        assert float(r["top5"]) == hist[-1]["test_top5"] and float(r["nll"]) == hist[-1]["test_nll"]
        assert float(r["ece"]) == hist[-1]["test_ece"]
        assert float(r["train_seconds"]) == pytest.approx(sum(h["seconds"] for h in hist))
    assert len(report.runs) == 12 and report.unfinished == 3
    assert [r.seed for r in collect_runs(root)] == [int(r["seed"]) for r in rows]


def test_results_md_means_stds_and_reference(tmp_path):
    root = _fake_sweep(tmp_path / "sweep")
    md = write_report(root).results_md.read_text()
    assert "12 finished runs; 3 unfinished runs left out." in md
    table = _table(md)
    assert list(table) == [("dkd+ls", "2"), ("dkd+ls", "4"), ("kd", "2"), ("kd", "4")]
    for (method, t), hists in _expected(root).items():
        row = table[(method, str(t))]
        last = [h[-1]["test_top1"] for h in hists]
        best = [max(x["test_top1"] for x in h) for h in hists]
        assert row[2:5] == [str(len(hists)), _pm(last), _pm(best)]
        assert row[5] == f"{statistics.mean(h[-1]['test_top5'] for h in hists):.2f}"
        assert (
            row[8] == f"{statistics.mean(sum(x['seconds'] for x in h) for h in hists):.1f}"
        )  # seconds of training per run
    assert table[("kd", "2")][3] == "71.31 ± 0.42"
    assert table[("kd", "2")][-2:] == ["70.00", "+1.31"]
    assert table[("kd", "4")][-2:] == ["72.00", "-3.08"]  # mean(68.5, 69.25, 69.0) - 72
    assert table[("dkd+ls", "2")][-2:] == ["–", "–"]


def test_single_run_prints_a_dash_for_the_std(tmp_path):
    root = tmp_path / "one"
    _write_run(root, "r8x4.kd", {}, "default", 0, [60.0, 73.5], epochs=2, reference=73.33)
    md = write_report(root).results_md.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| r8x4.kd"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["r8x4.kd", "1", "73.50 ± –", "73.50 ± –"] and cells[-2:] == ["73.33", "+0.17"]
    assert "1 finished run." in md


def test_curves_png_and_idempotence(tmp_path):
    root = _fake_sweep(tmp_path / "sweep")
    first = write_report(root)
    data = first.curves_png.read_bytes()
    assert data.startswith(PNG_MAGIC) and matplotlib.image.imread(first.curves_png).ndim == 3
    csv_text, md_text = first.summary_csv.read_bytes(), first.results_md.read_bytes()
    second = write_report(root)
    assert second.summary_csv.read_bytes() == csv_text and second.results_md.read_bytes() == md_text
    assert not list(root.glob("*.partial"))


def test_empty_sweep_writes_the_files(tmp_path):
    root = tmp_path / "empty"
    _write_run(root, "kd", {}, "default", 0, [10.0])  # 1 of 3 epochs
    report = write_report(root)
    assert report.rows == [] and report.unfinished == 1
    assert "No run has finished yet; 1 unfinished run left out." in report.results_md.read_text()
    assert report.summary_csv.read_text().splitlines() == [
        "method,seed,last_top1,best_top1,best_epoch,top5,nll,ece,train_seconds"
    ]
    assert report.curves_png.read_bytes().startswith(PNG_MAGIC)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "No run has finished yet." in write_report(bare).results_md.read_text()


def test_user_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(KdcacheError, match="sweep folder .*nope does not exist") as info:
        write_report(missing)
    assert "\n" not in str(info.value)
    root = tmp_path / "bad"
    folder = _write_run(root, "kd", {}, "default", 0, [10.0, 20.0, 30.0])
    (folder / "run.json").write_text(json.dumps({"method": "kd"}))
    with pytest.raises(KdcacheError, match="lacks 'grid'"):
        collect_runs(root)


# ---------------------------------------------------------------- the ls-cifar100 preset


@pytest.fixture(scope="module")
def preset() -> dict:
    return read_yaml(Path(str(files("kdcache.experiments") / "presets" / "ls-cifar100.yaml")))


def test_preset_has_every_pair_method_and_reference(preset):
    assert preset["dataset"] == "cifar100" and preset["grid"] == {} and preset["seeds"] == [0, 1, 2, 3]
    methods = preset["methods"]
    assert len(methods) == len(LS_PAIRS) * len(LS_METHODS) == 112
    assert set(methods) == {f"{t}-{s}.{m}" for t, s in LS_PAIRS for m in LS_METHODS}
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", name) for name in methods)
    assert set(preset["reference"]) == set(methods)  # the README prints a number for every cell
    assert all(isinstance(x, float) and 65 < x < 80 for x in preset["reference"].values())
    published = {"resnet32x4-resnet8x4.kd": 73.33, "resnet32x4-resnet8x4.mlkd+ls": 78.28, "vgg13-vgg8.dkd+ls": 74.81}
    published |= {"ResNet50-MobileNetV2.kd+ls": 69.02, "wrn_40_2-MobileNetV2.mlkd+ls": 71.61}
    assert {k: preset["reference"][k] for k in published} == published


def test_preset_rows_are_valid_train_student_options(preset):
    zoo = set(list_models())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, opts in preset["methods"].items():
        pair, method = name.split(".")
        assert (opts["teacher"], opts["student"]) in LS_PAIRS and f"{opts['teacher']}-{opts['student']}" == pair
        assert {opts["teacher"], opts["student"]} <= zoo
        assert opts["checkpoint"] == f"download_ckpts/cifar_teachers/{opts['teacher']}_vanilla/ckpt_epoch_240.pth"
        shared = {k: v for k, v in preset.items() if k not in ("methods", "grid", "seeds", "reference")}
        settings = parse_settings({**shared, **opts}, "train-student", name)
        TrainConfig(**{k: v for k, v in settings.items() if k in fields}).validate()
        base = method.removesuffix("+ls")
        assert settings["loss"] == ("kd" if base == "ctkd" else base)
        assert settings.get("logit_stand", False) == method.endswith("+ls")
        assert settings.get("ctkd", False) == (base == "ctkd")
        assert settings["augment"] == ("mlkd" if base == "mlkd" else "cifar")
        slow = opts["student"] in ("MobileNetV2", "ShuffleV2")
        if base != "mlkd":
            assert settings["lr"] == (0.01 if slow else 0.05) and settings["epochs"] == 240
