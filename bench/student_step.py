"""Student step time with (a) CE only, (b) logits from a cache, (c) the online teacher, in one run.

resnet32x4 -> resnet8x4 at CIFAR size (32x32, 100 classes), batch 64, KD loss.
The cache path is what the trainer does per batch: an in-RAM row gather from
the epoch's logits plus the loss; the online path runs the teacher in padded
blocks. Targets: b/a <= 1.05.
Run: ``python bench/student_step.py --steps 20``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.dataset.datasets import CIFAR_MEAN, CIFAR_STD, Normalization
from kdcache.losses.functions import kd_loss
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model
from kdcache.teacher.runner import load_teacher
from kdcache.views.recipes import normalize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    norm = Normalization(CIFAR_MEAN, CIFAR_STD)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(f"{tmp}/t.pth", create_model(args.teacher, 100))
        teacher = load_teacher(args.teacher, 100, norm, f"{tmp}/t.pth", device=args.device)
    dev = teacher.device
    student = create_model(args.student, 100).to(dev)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    views = torch.from_numpy(rng.integers(0, 256, (args.batch_size, 3, 32, 32), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 100, args.batch_size)).to(dev)
    cached = rng.standard_normal((50_000, 100)).astype(np.float16)
    idx = rng.permutation(50_000)[: args.batch_size]

    def step(mode: str) -> None:
        x = normalize(views.to(dev), norm.mean, norm.std)
        s = student(x)
        loss = F.cross_entropy(s, y)
        if mode == "cache":
            t = torch.from_numpy(cached[idx]).to(dev)
            loss = 0.1 * loss + 0.9 * kd_loss(s, t, 4.0)
        elif mode == "online":
            loss = 0.1 * loss + 0.9 * kd_loss(s, teacher(views).to(dev), 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {}
    for _rnd in range(2):  # interleave the modes so machine noise hits them alike
        for mode in ("ce", "cache", "online"):
            step(mode)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.setdefault(mode, []).append((time.perf_counter() - t0) / args.steps)
    a, b, c = (min(times[m]) for m in ("ce", "cache", "online"))
    print("| device | (a) CE only ms/step | (b) cache ms/step | (c) online ms/step | b/a | c/a |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {dev} | {a * 1e3:.1f} | {b * 1e3:.1f} | {c * 1e3:.1f} | {b / a:.3f} | {c / a:.2f} |")


if __name__ == "__main__":
    main()
