"""Soak test, run by hand: SIGKILL ``dump-logits`` and ``train-student`` at random moments, re-run, compare.

``python tests/sigkill_soak.py --kills 20`` writes a tiny CIFAR-100 folder and a
teacher checkpoint into a temporary directory, makes reference results
without interruption, then kills each command ``--kills`` times at random
moments (re-running it after every kill) and checks that the final cache is
bit-identical to the reference and that the resumed student's weights equal
the uninterrupted student's. Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from helpers import write_cifar100  # noqa: E402

from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _kill_loop(args: list[str], kills: int, rng: random.Random, window: tuple[float, float]) -> int:
    """Start ``args`` repeatedly, SIGKILL each run after a random delay; return how many kills landed."""
    landed = 0
    for _ in range(kills):
        proc = _cli(args)
        time.sleep(rng.uniform(*window))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait()
    if _cli(args).wait() != 0:
        raise SystemExit(f"final run of {' '.join(args[:1])} failed")
    return landed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_cifar100(tmp / "data", n_train=512, n_test=64)
        torch.manual_seed(0)
        save_checkpoint(tmp / "t.pth", create_model("resnet8", 100))
        dump = [
            "dump-logits",
            "--teacher",
            "resnet8",
            "--checkpoint",
            str(tmp / "t.pth"),
            "--dataset",
            "cifar100",
            "--data-root",
            str(root),
            "--augment",
            "mlkd",
            "--views",
            "40",
            "--batch-size",
            "64",
        ]
        subprocess.run(
            [sys.executable, "-m", "kdcache.cli", *dump, "--out", str(tmp / "ref.zarr")],
            check=True,
            capture_output=True,
        )
        landed = _kill_loop([*dump, "--out", str(tmp / "k.zarr")], args.kills, rng, (3.0, 9.0))
        ref, got = zarr.open_group(str(tmp / "ref.zarr")), zarr.open_group(str(tmp / "k.zarr"))
        same = all(np.array_equal(ref[n][...], got[n][...], equal_nan=True) for n in ref.array_keys())
        print(f"dump-logits: {landed} kills landed; final store bit-identical: {same}")

        train = [
            "train-student",
            "--cache",
            str(tmp / "ref.zarr"),
            "--student",
            "resnet8",
            "--dataset",
            "cifar100",
            "--data-root",
            str(root),
            "--loss",
            "kd",
            "--epochs",
            "12",
            "--batch-size",
            "32",
        ]
        subprocess.run(
            [sys.executable, "-m", "kdcache.cli", *train, "--out", str(tmp / "full")], check=True, capture_output=True
        )
        first = _cli([*train, "--out", str(tmp / "cut")])
        time.sleep(6.0)
        first.kill()
        first.wait()
        landed = 1 + _kill_loop([*train, "--out", str(tmp / "cut"), "--resume"], args.kills - 1, rng, (4.0, 9.0))
        a = torch.load(tmp / "full" / "last.pt", weights_only=True)["model"]
        b = torch.load(tmp / "cut" / "last.pt", weights_only=True)["model"]
        same_student = all(torch.equal(a[k], b[k]) for k in a)
        print(f"train-student --resume: {landed} kills; final weights identical: {same_student}")
    return 0 if same and same_student else 1


if __name__ == "__main__":
    raise SystemExit(main())
