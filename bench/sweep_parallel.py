"""Sweep wall time: the same 8 student runs on digits with --parallel 1 (all cores to one student) and --parallel 2.

Dumps one float32 digits cache from a seeded resnet8 teacher, then runs a SPEC of 2 methods x 4 seeds, alternating
``--parallel 1 --threads C`` and ``--parallel 2 --threads C/2`` (C = this machine's cores) in fresh folders, and
prints the wall times and their ratio per round. Memory per added student is measured by ``bench/shared_feed.py``.
Run with ``python bench/sweep_parallel.py [--rounds 2] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdcache.dump.loop import dump_logits
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model


def sweep(spec: Path, out: Path, parallel: int, threads: int) -> float:
    """Wall seconds of one ``kdcache sweep`` in a process of its own."""
    cmd = [sys.executable, "-m", "kdcache.cli", "sweep", str(spec), "--out", str(out)]
    cmd += ["--parallel", str(parallel), "--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(base / "t.pth", create_model("resnet8", 10))
        cache = base / "c.zarr"
        dump_logits(teacher="resnet8", checkpoint=str(base / "t.pth"), dataset="digits", augment="cifar", views=2,
                    out=str(cache), dtype="float32", progress=False)  # fmt: skip
        spec = base / "spec.yaml"
        methods = {"kd": {"loss": "kd"}, "dkd": {"loss": "dkd"}}
        body = {"cache": str(cache), "dataset": "digits", "student": "resnet8", "epochs": args.epochs}
        spec.write_text(json.dumps({**body, "methods": methods, "seeds": [0, 1, 2, 3]}))
        print(f"| round | --parallel 1 --threads {cores} (s) | --parallel 2 --threads {cores // 2} (s) | ratio |")
        print("|---:|---:|---:|---:|")
        for r in range(args.rounds):
            one = sweep(spec, base / f"p1-{r}", 1, cores)
            two = sweep(spec, base / f"p2-{r}", 2, max(1, cores // 2))
            print(f"| {r + 1} | {one:.1f} | {two:.1f} | {two / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
