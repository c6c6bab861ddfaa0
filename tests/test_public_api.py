"""The public API: every name imports from ``kdcache`` itself (lazily, without torch), the examples and docs/api.md use
nothing deeper, and ``write_report`` reports the run folders of a loop of your own as well as a sweep's."""

from __future__ import annotations

import ast
import csv
import json
import os
import pkgutil
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import kdcache

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {m.name for m in pkgutil.iter_modules(kdcache.__path__)}


def test_every_public_name_resolves_and_is_listed():
    names = dir(kdcache)
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None, name
        assert name in names, name
    assert len(set(kdcache.__all__)) == len(kdcache.__all__)
    assert set(kdcache.__all__) == {"KdcacheError", "__version__", *kdcache._LAZY}
    # each lazy name comes from its stage subpackage, which re-exports it
    for name, module in kdcache._LAZY.items():
        assert module.count(".") == 1 and module.split(".")[1] in SUBPACKAGES, (name, module)
        assert name in sys.modules[module].__all__, (name, module)
    for name in ("evaluate", "eval_loader", "build_dataset", "save_checkpoint", "load_checkpoint", "RunLog"):
        assert name in kdcache.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdcache.nope  # noqa: B018


def test_type_checking_block_imports_the_lazy_names():
    """What mypy and IDEs see (the ``if TYPE_CHECKING:`` imports) is what ``__getattr__`` gives at run time."""
    tree = ast.parse((ROOT / "pipeline" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {a.name: n.module for n in ast.walk(block) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert seen == kdcache._LAZY


def test_import_kdcache_does_not_import_torch():
    code = "import kdcache, sys; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def _deep_uses(source: str) -> list[str]:
    """``import kdcache.<sub>``, ``from kdcache.<sub> import`` and ``kdcache.<sub>.`` attribute uses in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("kdcache.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdcache."):
            found.append(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kdcache":
            found += [f"kdcache.{node.attr}"] if node.attr in SUBPACKAGES else []
    return found


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_examples_and_api_docs_import_only_from_kdcache():
    sources = {p.name: p.read_text() for p in sorted((ROOT / "examples").glob("*.py"))}
    blocks = _python_blocks((ROOT / "docs" / "api.md").read_text())
    assert len(sources) >= 4 and len(blocks) >= 3
    sources |= {f"docs/api.md block {i}": b for i, b in enumerate(blocks)}
    deep = {name: uses for name, src in sources.items() if (uses := _deep_uses(src))}
    assert deep == {}
    assert _deep_uses("import kdcache.feed\nfrom kdcache.train import x\nkdcache.store.open_store") == [
        "kdcache.feed",
        "kdcache.train",
        "kdcache.store",
    ]
    for name in re.findall(r"\bkdcache\.([A-Za-z_]\w*)\(", "\n".join(sources.values())):
        assert hasattr(kdcache, name), name


# ---------------------------------------------------------------- write_report on run folders of an own loop


def _own_loop(out: Path, seed: int, epochs: int = 2, lr: float = 0.5) -> list[dict]:
    """A loop of your own on digits: a linear student on 4x4-pooled pixels, ``config.yaml`` and a RunLog."""
    train, test = (kdcache.build_dataset("digits", None, s) for s in ("train", kdcache.test_split("digits")))

    def features(ds) -> torch.Tensor:
        x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255
        return F.avg_pool2d(x, 4).flatten(1)

    x, x_test = features(train), features(test)
    y, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], train.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    settings = {"loss": "ce", "student": "linear", "epochs": epochs, "lr": lr, "seed": seed}
    log = kdcache.RunLog(out)
    (out / "config.yaml").write_text(yaml.safe_dump(settings))
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y))
        for batch in order.split(128):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            metrics = kdcache.classification_metrics(model(x_test), y_test, train.num_classes)
        log.write({"epoch": epoch, "train_loss": loss.item(), **metrics, "seconds": 0.5 * epoch})
    log.close()
    return log.history()


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return rows[0], rows[2:]


def test_write_report_groups_own_loop_seeds(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        _own_loop(root / "linear" / f"seed-{seed}", seed)
    _own_loop(root / "linear-lr" / "seed-0", 0, lr=0.1)  # other settings: a row of its own
    _own_loop(root / "short" / "seed-0", 0, epochs=1)
    (root / "short" / "seed-0" / "config.yaml").write_text(yaml.safe_dump({"loss": "ce", "epochs": 3}))  # unfinished
    report = kdcache.write_report(root)
    assert [p.name for p in report.paths] == ["summary.csv", "results.md", "curves.png"]
    assert all(p.is_file() and p.parent == root for p in report.paths)

    md = report.results_md.read_text()
    assert "3 finished runs; 1 unfinished run left out." in md
    header, body = _table(md)
    assert header[:4] == ["method", "lr", "n", "top-1 last (%)"]
    rows = {(r[0], r[1]): r for r in body}
    assert sorted(rows) == [("ce", "0.1"), ("ce", "0.5")]
    hists = [
        [json.loads(line) for line in (root / "linear" / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()]
        for s in (0, 1)
    ]
    last = [h[-1]["test_top1"] for h in hists]
    best = [max(r["test_top1"] for r in h) for h in hists]
    assert last[0] != last[1]  # two seeds, two students
    row = rows[("ce", "0.5")]
    pm = [f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" for v in (last, best)]
    assert row[2:5] == ["2", *pm]
    assert row[5] == f"{statistics.mean(h[-1]['test_top5'] for h in hists):.2f}"
    assert row[6] == f"{statistics.mean(h[-1]['test_nll'] for h in hists):.3f}"
    assert row[-2:] == ["–", "–"]  # no published reference
    assert rows[("ce", "0.1")][2] == "1" and rows[("ce", "0.1")][3].endswith(" ± –")

    lines = list(csv.DictReader(report.summary_csv.open()))
    assert [(r["method"], r["lr"], r["seed"]) for r in lines] == [
        ("ce", "0.1", "0"),
        ("ce", "0.5", "0"),
        ("ce", "0.5", "1"),
    ]
    assert [float(r["last_top1"]) for r in lines[1:]] == last
    assert kdcache.write_report(root).results_md.read_text() == md  # the same folders, the same report


def test_write_report_names_a_run_without_loss_by_its_folder(tmp_path):
    run = tmp_path / "rkl" / "seed-4"
    log = kdcache.RunLog(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 4}))
    log.write({"epoch": 1, "test_top1": 12.5})  # a loop that logs top-1 only
    log.close()
    report = kdcache.write_report(tmp_path)
    (row,) = _table(report.results_md.read_text())[1]
    assert row[:4] == ["rkl", "1", "12.50 ± –", "12.50 ± –"] and row[4] == "–"
    assert report.runs[0].seed == 4


# ---------------------------------------------------------------- the CLI's --report on a sweep folder


def test_sweep_report_cli_prints_the_report_paths(tmp_path):
    out = tmp_path / "runs" / "sweep"
    for seed, top1 in ((0, 70.0), (1, 72.0)):
        folder = out / "runs" / "kd" / "default" / f"seed-{seed}"
        folder.mkdir(parents=True)
        meta = {"method": "kd", "grid": {}, "point": "default", "seed": seed, "epochs": 1, "reference": 71.0}
        (folder / "run.json").write_text(json.dumps(meta))
        record = {"epoch": 1, "test_top1": top1, "test_top5": 90.0, "test_nll": 1.0, "test_ece": 0.1, "seconds": 6.0}
        (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    # README.md: kdcache sweep spec.yaml --out runs/sweep --report
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "sweep", "spec.yaml", "--out", "runs/sweep", "--report"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("summary.csv", "results.md", "curves.png"):
        assert str(Path("runs/sweep") / name) in proc.stdout and (out / name).is_file()
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| kd "))
    assert "| 2 | 71.00 ± 1.41 |" in row and row.endswith("| 71.00 | +0.00 |")
