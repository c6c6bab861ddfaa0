"""The README's Python snippet runs as written, on the outputs it names."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- python-snippet -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no <!-- python-snippet --> block"
    return match.group(1)


@pytest.mark.slow  # a fresh interpreter trains the snippet's student on a 6-view digits cache (the README's own run)
def test_the_readme_python_snippet_runs_as_written(make_cache, tmp_path):
    cache = make_cache(dataset="digits", views=6, dtype="float32", copy_to=tmp_path / "data" / "quickstart")
    cache.rename(tmp_path / "data" / "quickstart" / "cache-cifar.zarr")
    proc = subprocess.run([sys.executable, "-c", _snippet()], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    top1 = float(re.search(r"test top-1 ([0-9.]+)%", proc.stdout).group(1))
    assert 0 <= top1 <= 100
