"""A sweep one can trust and watch: the report holds exactly the SPEC's runs, reference keys are grid points, grid and
method settings never clash silently, the ls-cifar100 preset reads like the LS README (tables and small-multiple
curves, on synthetic run folders), progress per epoch, the preset's checks before its first dump, and students that
die with a killed sweep."""

from __future__ import annotations

import colorsys
import csv
import fcntl
import io
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import pytest
import torch
from helpers import LS_METHODS, LS_PAIRS, cli, run_cli, write_cifar100

import kdcache
from kdcache.errors import KdcacheError
from kdcache.experiments.monitor import TASK_FILE, SweepMonitor
from kdcache.experiments.report import curve_panels, write_manifest, write_report
from kdcache.experiments.sweep import expand, load_spec, preset_path, sweep_command, sweep_manifest
from kdcache.plots import sweep_figure

STUDENT = {"dataset": "digits", "student": "resnet8", "cache": "/nonexistent/c.zarr", "epochs": 3}


def _spec(path: Path, **body) -> Path:
    path.write_text(json.dumps({**STUDENT, **body}))  # JSON is YAML
    return path


def _curve(run, rng: random.Random) -> list[dict]:
    """Synthetic metrics.jsonl records of a run: top-1 rising towards its reference (or 70), seed noise."""
    top = run.reference or 70.0
    return [
        {
            "epoch": e,
            "test_top1": round(top * (1 - 0.7 * math.exp(-5 * e / run.epochs)) + rng.gauss(0, 0.3), 2),
            "test_top5": 90.0,
            "test_nll": 1.0,
            "test_ece": 0.05,
            "seconds": 20.0,
        }
        for e in range(1, run.epochs + 1)
    ]


def _sweep_folders(out: Path, spec: Path | kdcache.SweepSpec, preset: str | None = None, skip=()) -> list:
    """The run folders and sweep.json a sweep of ``spec`` writes, with synthetic finished metrics (runs named in
    ``skip`` are left unfinished): what a report reads, without training."""
    loaded = load_spec(spec) if isinstance(spec, Path) else spec
    loaded.preset = preset
    runs = expand(loaded)
    for run in runs:
        folder = out / run.folder
        if (folder / "metrics.jsonl").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(json.dumps(run.record()))
        records = _curve(run, random.Random(run.name))
        if run.name in skip:
            records = records[:-1]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_manifest(out, sweep_manifest(loaded, runs))
    return runs


# ---------------------------------------------------------------- reference keys are grid points


def test_reference_keys_are_parsed_as_grid_points(tmp_path):
    grid = {"temperature": [2, 4], "kd-weight": [1, 9]}
    reference = {"kd": {"temperature=2.0, kd_weight=9": 80, "kd-weight=1,temperature='4'": 70.5}, "dkd": 75}
    runs = expand(load_spec(_spec(tmp_path / "s.yaml", methods={"kd": {}, "dkd": {}}, grid=grid, reference=reference)))
    refs = {r.name: r.reference for r in runs}
    assert refs["kd/temperature=2,kd-weight=9/seed-0"] == 80.0
    assert refs["kd/temperature=4,kd-weight=1/seed-0"] == 70.5
    assert refs["kd/temperature=2,kd-weight=1/seed-0"] is None
    assert {v for k, v in refs.items() if k.startswith("dkd/")} == {75.0}
    plain = expand(load_spec(_spec(tmp_path / "d.yaml", methods={"kd": {}}, reference={"kd": {"default": 71}})))
    assert plain[0].reference == 71.0


BAD_REFERENCES = [
    ({"kd": {"temprature=4": 70}}, "names 'temprature', which is not a grid option (the grid has temperature)"),
    ({"kd": {"temperature=3": 70}}, "temperature 3 is not in the grid (2, 4)"),
    ({"kd": {"temperature=2": "80"}}, "'80' is text, not a number: write the published top-1 without quotes"),
    ({"kd": "80"}, "reference kd: '80' is text, not a number"),
    ({"kd": {"default": 80}}, "names 'default', which is not a grid option"),
    ({"kd": {"temperature=2,temperature=4": 80}}, "names temperature twice"),
    ({"nope": 70}, "reference names 'nope', which is not a method"),
]


@pytest.mark.parametrize("reference,message", BAD_REFERENCES, ids=range(len(BAD_REFERENCES)))
def test_a_reference_key_that_matches_no_point_is_refused_before_any_run(tmp_path, reference, message):
    spec = _spec(tmp_path / "s.yaml", methods={"kd": {}}, grid={"temperature": [2, 4]}, reference=reference)
    with pytest.raises(KdcacheError, match=re.escape(message)):
        load_spec(spec)
    r = cli("sweep", spec, "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


CLASHES = [
    (
        {"methods": {"kd": {"loss": "kd", "temperature": 3}}, "grid": {"temperature": [2, 4]}},
        "method kd sets temperature: 3.0, which the grid also sets",
    ),
    ({"temperature": 3, "grid": {"temperature": [2, 4]}}, "temperature: 3.0 at the top level is never used"),
    ({"grid": {"temperature": [4, 4.0]}}, "grid temperature lists 4 and 4.0, the same value"),
    ({"grid": {"kd-weight": [1, 9, 1]}}, "grid kd-weight lists 1 and 1, the same value"),
]


@pytest.mark.parametrize("body,message", CLASHES, ids=range(len(CLASHES)))
def test_grid_clashes_are_refused_by_name(tmp_path, body, message):
    spec = _spec(tmp_path / "s.yaml", **body)
    r = cli("sweep", spec, "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the report holds exactly the SPEC's runs


def test_an_edited_spec_reports_exactly_its_own_runs(tmp_path):
    out = tmp_path / "out"
    methods = {"kd": {"loss": "kd"}, "dkd": {"loss": "dkd"}}
    first = _spec(tmp_path / "a.yaml", methods=methods, grid={"temperature": [2, 4]}, seeds=[0, 1, 2])
    assert len(_sweep_folders(out, first)) == 12
    assert "12 of 12 runs of this SPEC finished." in write_report(out).results_md.read_text()
    edited = _spec(tmp_path / "b.yaml", methods=methods, grid={"temperature": [2, 8]}, seeds=[0, 1])  # 4 -> 8, no 2
    runs = _sweep_folders(out, edited)
    report = write_report(out)
    md = report.results_md.read_text()
    assert "8 of 8 runs of this SPEC finished." in md and len(report.runs) == 8 and report.planned == 8
    assert {r.name for r in runs} == {str(r.path.relative_to(out / "runs")) for r in report.runs}
    rows = list(csv.DictReader(report.summary_csv.open()))
    assert len(rows) == 8 and {r["temperature"] for r in rows} == {"2", "8"} and {r["seed"] for r in rows} == {"0", "1"}
    for row in report.rows:  # every mean is of the edited SPEC's two seeds only
        last = [json.loads((r.path / "metrics.jsonl").read_text().splitlines()[-1])["test_top1"] for r in row.runs]
        assert row.n == 2 and row.last_top1[0] == pytest.approx(statistics.mean(last))
    assert sorted(report.stale) == sorted(
        [f"{m}/temperature=4/seed-{s}" for m in methods for s in (0, 1, 2)]
        + [f"{m}/temperature=2/seed-2" for m in methods]
    )
    (stale_line,) = [line for line in md.splitlines() if line.startswith("Not in this SPEC")]
    assert "(8 runs;" in stale_line and "kd/temperature=4 (seed 0, 1, 2)" in stale_line
    assert md.count("temperature=4") == 2  # kd and dkd, once each, in that line only

    lines, _ = sweep_command(out=str(out), report=True, prune=True)  # --report --prune moves them aside
    assert sum(line.startswith("pruned") for line in lines) == 8
    assert (out / "pruned" / "runs" / "kd" / "temperature=4" / "seed-0" / "metrics.jsonl").is_file()
    assert not (out / "runs" / "kd" / "temperature=4").exists()
    md = (out / "results.md").read_text()
    assert "Not in this SPEC" not in md and "8 of 8 runs of this SPEC finished." in md
    assert len(write_report(out).runs) == 8  # pruned runs are never plain runs either


def test_report_counts_unfinished_runs_of_the_spec(tmp_path):
    out = tmp_path / "out"
    spec = _spec(tmp_path / "a.yaml", methods={"kd": {}}, seeds=[0, 1, 2])
    _sweep_folders(out, spec, skip={"kd/default/seed-2"})
    md = write_report(out).results_md.read_text()
    assert "2 of 3 runs of this SPEC finished; 1 unfinished run left out." in md


# ---------------------------------------------------------------- the preset reads like the LS README


@pytest.fixture(scope="module")
def ls_sweep(tmp_path_factory) -> kdcache.Report:
    """Synthetic run folders of the whole ls-cifar100 preset (448 runs, their real epochs); one run of
    resnet32x4-resnet8x4.kd unfinished."""
    out = tmp_path_factory.mktemp("ls") / "out"
    spec = load_spec(preset_path("ls-cifar100"))
    _sweep_folders(out, spec, preset="ls-cifar100", skip={"resnet32x4-resnet8x4.kd/default/seed-3"})
    return write_report(out)


def _tables(md: str, section: str) -> list[list[list[str]]]:
    """The markdown tables of one ``## section`` of results.md, as rows of cells."""
    body = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    tables, current = [], []
    for line in body.splitlines():
        if line.startswith("| "):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_the_presets_results_md_has_the_ls_readme_layout(ls_sweep):
    md = ls_sweep.results_md.read_text()
    root = ls_sweep.results_md.parent
    preset = load_spec(preset_path("ls-cifar100"))
    assert "447 of 448 runs of this SPEC finished; 1 unfinished run left out." in md
    assert "sample standard deviation over seeds (ddof 1" in md and "measured on the test split" in md
    assert f"kdcache {kdcache.__version__}; SPEC `spec.yaml` (preset ls-cifar100)" in md
    assert "Shared settings: dataset cifar100, data-root data." in md
    assert "Epochs: 240 (kd, kd+ls, ctkd, ctkd+ls, dkd, dkd+ls), 480 (mlkd, mlkd+ls for 13 pairs), 960 (mlkd, " in md
    for section, metric in (("Best-epoch test top-1", "best"), ("Last-epoch test top-1", "last")):
        tables = _tables(md, section)
        assert len(tables) == 2  # the README's two tables of 7 pairs
        columns = [c for t in tables for c in t[0][1:]]
        assert columns == [f"{t}<br>{s}" for t, s in LS_PAIRS]
        for table in tables:
            assert table[0][0] == "teacher<br>student" and [row[0] for row in table[2:]] == LS_METHODS
        for j, (t, s) in enumerate(LS_PAIRS):
            table, col = tables[j // 7], 1 + j % 7
            for i, method in enumerate(LS_METHODS):
                name = f"{t}-{s}.{method}"
                runs = sorted((root / "runs" / name / "default").glob("seed-*/metrics.jsonl"))
                hists = [[json.loads(x) for x in p.read_text().splitlines()] for p in runs]
                hists = [h for h in hists if len(h) == h[-1]["epoch"] and h[-1]["epoch"] == len(h)]
                values = [max(r["test_top1"] for r in h) if metric == "best" else h[-1]["test_top1"] for h in hists]
                values = values if name != "resnet32x4-resnet8x4.kd" else values[:3]
                ref = preset.reference[name]
                mean = statistics.mean(values)
                cell = f"{mean:.2f} ± {statistics.stdev(values):.2f} ({ref:.2f}, {mean - ref:+.2f})"
                assert table[2 + i][col] == cell + (" n=3" if name == "resnet32x4-resnet8x4.kd" else ""), name
    flat = _tables(md, "Every method and grid point")[0]
    assert len(flat) == 2 + 112 and flat[0][:3] == ["method", "n", "top-1 last (%)"]
    assert len(list(csv.DictReader(ls_sweep.summary_csv.open()))) == 447
    assert json.loads((root / "sweep.json").read_text())["preset"] == "ls-cifar100"


def _rgb(colour) -> tuple[float, float, float]:
    return tuple(float(c) for c in matplotlib.colors.to_rgb(colour))


def test_the_presets_112_curves_are_small_multiples_with_one_legend_outside(ls_sweep):
    panels, methods, points = curve_panels(ls_sweep.rows)
    assert list(panels) == [f"{t} → {s}" for t, s in LS_PAIRS] and methods == LS_METHODS and points == []
    fig = sweep_figure(panels, methods, points, "test")
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 14 and [ax.get_title() for ax in axes] == list(panels)
    colours: dict[str, set] = {}
    for ax in axes:
        lines = ax.get_lines()
        assert len(lines) == 8
        for method, line in zip(LS_METHODS, lines, strict=True):
            colours.setdefault(method, set()).add(_rgb(line.get_color()))
    assert all(len(c) == 1 for c in colours.values())  # one colour per method in every panel
    assert len({next(iter(c)) for c in colours.values()}) == 8  # and eight different ones
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == LS_METHODS
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in axes)  # outside every panel
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
    assert box.width < fig.bbox.width and box.height < 0.1 * fig.bbox.height  # smaller than the plot
    matplotlib.pyplot.close(fig)
    png = matplotlib.image.imread(ls_sweep.curves_png)
    assert png.shape[1] >= 1400 and png.shape[0] >= 1000  # 4 x 4 panels at 110 dpi


def test_grid_points_are_shades_of_their_methods_colour(tmp_path):
    out = tmp_path / "out"
    methods = {"kd": {}, "dkd": {"loss": "dkd"}}
    _sweep_folders(out, _spec(tmp_path / "s.yaml", methods=methods, grid={"temperature": [1, 2, 4]}, seeds=[0, 1]))
    panels, names, points = curve_panels(write_report(out).rows)
    assert list(panels) == [""] and names == ["kd", "dkd"] and points == [f"temperature={t}" for t in (1, 2, 4)]
    fig = sweep_figure(panels, names, points, "test")
    lines = fig.axes[0].get_lines()
    for method in range(2):
        hls = [colorsys.rgb_to_hls(*_rgb(line.get_color())) for line in lines[3 * method : 3 * method + 3]]
        assert max(h for h, _, _ in hls) - min(h for h, _, _ in hls) < 0.02  # one hue
        assert hls[0][1] > hls[1][1] > hls[2][1]  # lighter to darker
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["kd", "dkd", *points]
    matplotlib.pyplot.close(fig)


# ---------------------------------------------------------------- progress per epoch


@dataclass
class _Run:
    name: str
    folder: Path
    epochs: int


def _grow(out: Path, run: _Run, epochs: range) -> None:
    with (out / run.folder / "metrics.jsonl").open("a") as f:
        for e in epochs:
            f.write(json.dumps({"epoch": e, "test_top1": 10.0 * e, "seconds": 2.0}) + "\n")


def test_off_a_terminal_each_finished_epoch_is_one_line(tmp_path, capsys):
    runs = [_Run(f"kd/default/seed-{s}", Path("runs") / "kd" / "default" / f"seed-{s}", 3) for s in (0, 1)]
    for run in runs:
        (tmp_path / run.folder).mkdir(parents=True)
    _grow(tmp_path, runs[1], range(1, 2))  # resumed after its first epoch
    monitor = SweepMonitor(runs, tmp_path, terminal=False)
    monitor.started(runs[0], False)
    monitor.started(runs[1], True)
    _grow(tmp_path, runs[0], range(1, 3))  # two epochs between two looks: two lines
    monitor.poll(force=True)
    _grow(tmp_path, runs[1], range(2, 4))
    monitor.poll(force=True)
    monitor.ended(runs[1])
    monitor.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["started   kd/default/seed-0", "resumed   kd/default/seed-1"]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 4
    assert epochs[0].startswith("epoch     kd/default/seed-0: epoch 1/3, top-1 10.00%, ETA 4 s; sweep 2/6 epochs")
    assert "epoch 2/3, top-1 20.00%, ETA 2 s; sweep 3/6 epochs (50%), 0/2 runs" in epochs[1]
    assert "kd/default/seed-1: epoch 3/3, top-1 30.00%, ETA 0 s; sweep 5/6 epochs (83%), 0/2 runs, ETA " in epochs[3]


def test_on_a_terminal_the_display_refreshes_and_dask_tasks_start_when_their_worker_does(tmp_path, capsys):
    run = _Run("kd/default/seed-0", Path("runs") / "kd" / "default" / "seed-0", 2)
    (tmp_path / run.folder).mkdir(parents=True)
    screen = io.StringIO()
    monitor = SweepMonitor([run], tmp_path, terminal=True, stream=screen)
    monitor.queued(run)
    monitor.poll(force=True)
    assert "started" not in capsys.readouterr().out  # queued on the cluster, not yet on a worker
    (tmp_path / run.folder / TASK_FILE).write_text(json.dumps({"host": "w1", "pid": 1, "resumed": False}))
    monitor.poll(force=True)
    _grow(tmp_path, run, range(1, 2))
    monitor.poll(force=True)
    monitor.ended(run)
    monitor.close()
    out = capsys.readouterr().out
    assert out.startswith("started   kd/default/seed-0") and "epoch " not in out  # the display, not lines
    shown = screen.getvalue()
    assert "kd/default/seed-0 1/2 epochs, top-1 10.00%, ETA 2 s" in shown and "1/2 epochs, 1/1 runs" in shown


# ---------------------------------------------------------------- the preset checks everything before its first dump


def test_the_preset_names_every_missing_input_in_spec_keys_before_anything(tmp_path):
    r = cli("sweep", "--preset", "ls-cifar100", "--out", "runs/ls", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    line = lines[0]
    assert (
        "CIFAR-100 not found under data/cifar-100-python: set download: true (needs internet) or data-root: DIR" in line
    )
    assert "--download" not in line and "--data-root" not in line
    assert "6 teacher checkpoints named by the SPEC's checkpoint: are missing" in line
    assert "download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth" in line and "and 2 more" in line
    assert "untar cifar_teachers.tar" in line and str(preset_path("ls-cifar100")) in line
    assert not (tmp_path / "runs").exists()


def _preset_inputs(root: Path) -> None:
    """What ls-cifar100 needs on disk, as files of the right names (a tiny CIFAR-100, placeholder checkpoints)."""
    write_cifar100(root / "data")
    for teacher in ("resnet32x4", "vgg13", "wrn_40_2", "resnet56", "resnet110", "ResNet50"):
        folder = root / "download_ckpts" / "cifar_teachers" / f"{teacher}_vanilla"
        folder.mkdir(parents=True)
        (folder / "ckpt_epoch_240.pth").write_bytes(b"placeholder")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="states the CPU estimate only where no GPU is visible")
def test_the_preset_on_a_cpu_states_its_work_and_starts_only_with_yes(tmp_path):
    _preset_inputs(tmp_path)
    r = cli("sweep", "--preset", "ls-cifar100", "--out", "runs/ls", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(
        "error: preset ls-cifar100: 448 runs, 138,240 student epochs (runs × epochs: 336 × 240, 104 × 480, 8 × 960); "
        "448 runs to go, 13 teacher caches to dump first; no GPU is visible: on this CPU about "
    )
    assert "(one timed step of each student; the teacher dumps come on top): pass --yes to start it" in lines[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- end to end: watchable, and exactly the SPEC


@pytest.fixture(scope="module")
def setup(make_cache, cifar_data) -> dict:
    student = {"dataset": "cifar100", "data-root": str(cifar_data), "student": "resnet8", "batch-size": 64}
    return {**student, "cache": str(make_cache(dtype="float32"))}


def _real_spec(path: Path, setup: dict, **body) -> Path:
    path.write_text(json.dumps({**setup, "epochs": 2, "methods": {"kd": {"loss": "kd"}}, **body}))
    return path


@pytest.mark.slow
def test_a_sweep_off_a_terminal_prints_each_epoch_and_reports_exactly_its_spec(tmp_path, setup):
    out = tmp_path / "out"
    first = _real_spec(tmp_path / "a.yaml", setup, grid={"temperature": [2, 4]})
    r = run_cli("sweep", first, "--out", out, check=True)  # stdout and stderr are pipes, as under nohup
    epochs = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 4 and "kd/temperature=4/seed-0: epoch 2/2, top-1 " in epochs[-1], r.stdout
    assert (out / "spec.yaml").read_bytes() == first.read_bytes()
    edited = _real_spec(tmp_path / "b.yaml", setup, grid={"temperature": [2, 8]})
    r = run_cli("sweep", edited, "--out", out, check=True)
    assert "(2 of 2 runs)" in r.stdout and r.stdout.count("started") == 1
    assert "1 run folder in" in r.stdout and "is not in this SPEC" in r.stdout
    md = (out / "results.md").read_text()
    assert "2 of 2 runs of this SPEC finished." in md and "kd/temperature=4 (seed 0)" in md
    assert (out / "spec.yaml").read_bytes() == edited.read_bytes()
    r = run_cli("sweep", edited, "--out", out, "--prune", check=True)
    assert "pruned    kd/temperature=4/seed-0 -> pruned/runs/kd/temperature=4/seed-0" in r.stdout
    assert "Not in this SPEC" not in (out / "results.md").read_text()


@pytest.mark.slow
def test_dask_runs_print_started_when_their_worker_starts_them(tmp_path, setup):
    spec = _real_spec(tmp_path / "s.yaml", setup, epochs=1, seeds=[0, 1])
    r = run_cli("sweep", spec, "--out", tmp_path / "out", "--local-cluster", "1", check=True)
    lines = r.stdout.splitlines()
    for seed in (0, 1):
        name = f"kd/default/seed-{seed}"
        states = [line.split()[0] for line in lines if line.endswith(name) or f" {name}:" in line]
        assert states == ["queued", "started", "epoch", "finished"], lines


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _is_forkserver(pid: int) -> bool:
    try:
        return b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="students fork from a server on Linux")
@pytest.mark.parametrize("when", ["fork-server start-up", "mid-run"])
def test_students_die_with_a_sigkilled_sweep(tmp_path, setup, when):
    spec = _real_spec(tmp_path / "s.yaml", setup, epochs=3, seeds=[0, 1])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kdcache.cli", "sweep", str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    first = out / "runs" / "kd" / "default" / "seed-0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        servers = [p for p in _children(proc.pid) if _is_forkserver(p)]
        if (servers and when != "mid-run") or (when == "mid-run" and (first / "last.pt").exists()):
            break
        time.sleep(0.005)
    forked = _children(servers[0]) if when != "mid-run" and servers else None  # students forked before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    if when == "mid-run":
        lock = os.open(first / ".lock", os.O_RDWR)
        while True:  # the student stops at once: its run lock comes free
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # a bound for a hang, not a speed: that the student trained no further shows in metrics.jsonl below
                assert time.monotonic() - killed < 60, "the student outlived the killed sweep by a minute"
                time.sleep(0.02)
        os.close(lock)
        size = (first / "metrics.jsonl").stat().st_size
    else:
        assert forked == [], "a student was forked before the kill: the test missed the start-up"
    time.sleep(12 if when != "mid-run" else 4)  # long enough for the fork server to import torch and fork
    second = out / "runs" / "kd" / "default" / "seed-1"
    assert not (second / "config.yaml").exists() and not (second / "metrics.jsonl").exists()  # nothing started
    if when == "mid-run":
        assert (first / "metrics.jsonl").stat().st_size == size
    else:
        assert not (first / "config.yaml").exists() and not (first / "metrics.jsonl").exists()
