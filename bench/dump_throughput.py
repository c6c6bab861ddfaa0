"""Dump throughput against pure teacher inference on the same views, batch size and device, in one run.

(a) teacher forward alone over views built beforehand, in the same padded
blocks; (b) the loop of ``dump_logits`` (views built by DataLoader workers or
a prefetch thread, teacher, buffered background writes; the whole command adds
start-up and the final per-view accuracy pass). (a) and (b) alternate
``--repeats`` times so load on a shared machine hits both alike; the table
reports the median of the per-round ratios a/b time, the share of the dump
spent on inference. The target is >= 0.95.
Run: ``python bench/dump_throughput.py --teacher resnet8 --views 16 --workers 0``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from kdcache.data import build_dataset
from kdcache.dump import dump_logits
from kdcache.models import create_model, save_checkpoint
from kdcache.teacher import load_teacher
from kdcache.views import make_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="resnet8")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--forward-block", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ds = build_dataset("digits")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = f"{tmp}/t.pth"
        torch.manual_seed(0)
        save_checkpoint(ckpt, create_model(args.teacher, ds.num_classes))
        teacher = load_teacher(args.teacher, ds.num_classes, ds.norm, ckpt, device=args.device, forward_block=args.forward_block)
        recipe = make_recipe("cifar", True)
        v_idx, s_idx = np.repeat(np.arange(args.views), len(ds)), np.tile(np.arange(len(ds)), args.views)
        params = recipe.params_batch(0, v_idx, s_idx, 0, np.full((len(v_idx), 2), 32))
        views = recipe.apply_batch([ds.image(int(i)) for i in s_idx], params)
        teacher(views[: args.forward_block])  # warm-up
        infer, loop, whole = [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            for s in range(0, len(views), args.batch_size):
                teacher(views[s : s + args.batch_size])
            infer.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = dump_logits(teacher=args.teacher, checkpoint=ckpt, dataset="digits", augment="cifar", views=args.views,
                                  out=f"{tmp}/c{r}.zarr", batch_size=args.batch_size, forward_block=args.forward_block,
                                  workers=args.workers, device=args.device, progress=False)
            whole.append(time.perf_counter() - t0)
            loop.append(summary.seconds)
    n = len(views)
    ratio = statistics.median(a / b for a, b in zip(infer, loop))
    print("| teacher | device | workers | views | inference only (views/s) | dump loop (views/s) | inference/dump loop (median of rounds) | whole command (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.teacher} | {teacher.device} | {args.workers} | {n} | {n / statistics.median(infer):,.0f} | "
          f"{n / statistics.median(loop):,.0f} | {ratio:.2f} ({', '.join(f'{a / b:.2f}' for a, b in zip(infer, loop))}) | "
          f"{statistics.median(whole):.1f} |")


if __name__ == "__main__":
    main()
