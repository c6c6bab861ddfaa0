"""kdcache sweep: grid expansion and run names, bad SPECs, parallel = serial, resume after SIGKILL, shared dumps."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli, run_cli

from kdcache.experiments.sweep import expand, load_spec


@pytest.fixture(scope="module")
def setup(make_cache, teacher_ckpt, cifar_data) -> dict:
    """The session's float32 cache of two cifar views of the tiny CIFAR-100 folder, its teacher checkpoint, and the
    SPEC keys of a student of that data (96 samples: a sweep's runs take a second each)."""
    student = {"dataset": "cifar100", "data-root": str(cifar_data), "student": "resnet8", "batch-size": 64}
    return {"ckpt": teacher_ckpt[100], "cache": make_cache(dtype="float32"), "student": student}


def _spec(path: Path, setup: dict, **extra) -> Path:
    body = {**setup["student"], "cache": str(setup["cache"]), "epochs": 1}
    body.update(extra)
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _metrics(out: Path) -> dict[str, list[dict]]:
    """Every run's metrics without the wall-clock seconds, by run folder."""
    runs = {}
    for m in sorted(out.glob("runs/*/*/seed-*/metrics.jsonl")):
        rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        runs[str(m.parent.relative_to(out))] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return runs


def test_grid_expansion_and_run_names(tmp_path, setup):
    spec = _spec(
        tmp_path / "s.yaml",
        setup,
        methods={"kd": {"loss": "kd"}, "kd+ls": {"loss": "kd", "logit-stand": True}},
        grid={"kd-weight": [1, 9], "temperature": [2, 4]},
        seeds=[0, 5],
        reference={"kd": 71.5, "kd+ls": {"kd-weight=9,temperature=2": 76.6}},
    )
    runs = expand(load_spec(spec))
    assert len(runs) == 2 * 4 * 2
    assert runs[0].name == "kd/kd-weight=1,temperature=2/seed-0"
    assert runs[-1].name == "kd+ls/kd-weight=9,temperature=4/seed-5"
    assert [r.name for r in runs[:4]] == [
        "kd/kd-weight=1,temperature=2/seed-0",
        "kd/kd-weight=1,temperature=2/seed-5",
        "kd/kd-weight=1,temperature=4/seed-0",
        "kd/kd-weight=1,temperature=4/seed-5",
    ]
    ls = {r.name: r for r in runs if r.method == "kd+ls"}
    hit = ls["kd+ls/kd-weight=9,temperature=2/seed-0"]
    assert hit.reference == 76.6 and hit.options["kd_weight"] == 9.0 and hit.options["logit_stand"] is True
    assert ls["kd+ls/kd-weight=1,temperature=2/seed-0"].reference is None
    assert {r.reference for r in runs if r.method == "kd"} == {71.5}
    assert str(runs[0].folder) == "runs/kd/kd-weight=1,temperature=2/seed-0"


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"kd-wieght": 9}, "kd-weight"),
        ({"grid": {"kd-weight": []}}, "grid kd-weight needs a non-empty list"),
        ({"seeds": [0, "one"]}, "seeds: takes a list of distinct integers"),
        ({"cache": "/nonexistent/c.zarr"}, "does not exist"),
        ({"methods": {"kd": {"loss": "kd", "tempreature": 2}}}, "method kd"),
        ({"seed": 3}, "seed is set by the sweep"),
        ({"reference": {"nope": 70.0}}, "'nope', which is not a method"),
    ],
)
def test_bad_specs_are_refused_before_any_run(tmp_path, setup, extra, message):
    spec = _spec(tmp_path / "bad.yaml", setup, **extra)
    r = cli("sweep", spec, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "runs").exists()


METHODS = {"kd": {"loss": "kd"}, "dkd+ls": {"loss": "dkd", "logit-stand": True}}


SERIAL = dict(methods=METHODS, seeds=[0, 1], epochs=2)  # the SPEC of the serial sweep the slow tests compare with


@pytest.fixture(scope="module")
def serial(tmp_path_factory, setup) -> Path:
    """A serial, uninterrupted sweep of SERIAL, made once for the tests that compare other ways of running it: its
    folder (read it, never sweep into it)."""
    base = tmp_path_factory.mktemp("serial")
    proc = run_cli("sweep", _spec(base / "s.yaml", setup, **SERIAL), "--out", base / "out", check=True)
    assert "results" in proc.stdout
    return base / "out"


@pytest.mark.slow
def test_parallel_equals_serial_and_changed_specs(tmp_path, setup, serial):
    spec = _spec(tmp_path / "s.yaml", setup, **SERIAL)
    run_cli("sweep", str(spec), "--out", str(tmp_path / "p2"), "--parallel", "2", check=True)
    a, b = _metrics(serial), _metrics(tmp_path / "p2")
    assert len(a) == 4 and a == b
    for f in ("summary.csv", "results.md", "curves.png"):
        assert (serial / f).is_file() and (tmp_path / "p2" / f).is_file()
    finished = tmp_path / "p2" / "runs" / "kd" / "default" / "seed-0" / "last.pt"
    stamp = finished.stat().st_mtime_ns
    more = _spec(tmp_path / "more.yaml", setup, **{**SERIAL, "seeds": [0, 1, 2]})
    again = run_cli("sweep", str(more), "--out", str(tmp_path / "p2"), check=True)
    assert again.stdout.count("started") == 2 and finished.stat().st_mtime_ns == stamp
    changed = {**SERIAL, "methods": {**METHODS, "kd": {"loss": "kd", "temperature": 3}}}
    r = cli("sweep", _spec(tmp_path / "changed.yaml", setup, **changed), "--out", tmp_path / "p2")  # refused first
    assert r.returncode == 2 and "sweep run kd/default/seed-0" in r.stderr and "temperature" in r.stderr


def _sweep_process(spec: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "kdcache.cli", "sweep", str(spec), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_sigkill_then_the_same_command_gives_the_uninterrupted_results(tmp_path, setup, serial):
    spec = _spec(tmp_path / "s.yaml", setup, **SERIAL)
    out = tmp_path / "cut"
    proc = _sweep_process(spec, out)
    second = out / "runs" / "kd" / "default" / "seed-1" / "last.pt"  # the second run has saved an epoch
    deadline = time.monotonic() + 300
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.exists() and not (out / "results.md").exists()
    lock = os.open(second.parent / ".lock", os.O_RDWR)
    deadline = time.monotonic() + 10
    while True:  # the student dies with the sweep (no orphan keeps training): its run lock comes free
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "the student outlived the killed sweep"
            time.sleep(0.1)
    os.close(lock)
    run_cli("sweep", str(spec), "--out", str(out), check=True)
    assert _metrics(out) == _metrics(serial)


@pytest.mark.slow
def test_teacher_checkpoint_methods_share_one_dumped_cache(tmp_path, setup):
    teacher = {"teacher": "resnet8", "checkpoint": str(setup["ckpt"])}
    methods = {"kd": {**teacher, "loss": "kd"}, "dkd": {**teacher, "loss": "dkd"}}
    body = {**setup["student"], "epochs": 1, "methods": methods, "dump": {"views": 1}}
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(body))
    r = run_cli("sweep", str(spec), "--out", str(tmp_path / "out"), check=True)
    caches = list((tmp_path / "out" / "caches").glob("*.zarr"))
    assert len(caches) == 1 and sum(line.startswith("finished") for line in r.stdout.splitlines()) == 2
    again = run_cli("sweep", str(spec), "--out", str(tmp_path / "out"), check=True)  # nothing to redo or refuse
    assert "started" not in again.stdout and sum(line.startswith("finished") for line in again.stdout.splitlines()) == 2
    for run in (tmp_path / "out" / "runs").glob("*/default/seed-0"):
        assert json.loads((run / "run.json").read_text())["options"]["cache"] == [str(caches[0])]
        assert (run / "config.yaml").is_file()


@pytest.mark.slow
def test_dask_local_cluster_sweep_equals_local(tmp_path, setup, serial):
    spec = _spec(tmp_path / "s.yaml", setup, **{**SERIAL, "seeds": [0]})  # the serial sweep's seed-0 runs
    run_cli("sweep", str(spec), "--out", str(tmp_path / "dask"), "--local-cluster", "2", check=True)
    local = {run: rows for run, rows in _metrics(serial).items() if run.endswith("seed-0")}
    assert len(local) == 2 and _metrics(tmp_path / "dask") == local
