"""Dump throughput against pure teacher inference on the same views, batch size and device, in one run.

(a) teacher forward alone over views built beforehand, in the same padded
blocks; (b) the loop of ``dump_logits`` (views built by DataLoader workers,
teacher, buffered background writes; the whole command adds start-up and the
final per-view accuracy pass). The ratio a/b time is the share of the
dump spent on inference; the target is >= 0.95.
Run: ``python bench/dump_throughput.py --teacher resnet8 --views 8``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from kdcache.data import build_dataset
from kdcache.dump import dump_logits
from kdcache.models import create_model, save_checkpoint
from kdcache.teacher import load_teacher
from kdcache.views import make_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="resnet8")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--forward-block", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    ds = build_dataset("digits")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = f"{tmp}/t.pth"
        torch.manual_seed(0)
        save_checkpoint(ckpt, create_model(args.teacher, ds.num_classes))
        teacher = load_teacher(args.teacher, ds.num_classes, ds.norm, ckpt, device=args.device, forward_block=args.forward_block)
        recipe = make_recipe("cifar", True)
        views = torch.stack([recipe.apply(ds.image(i), recipe.params(0, v, i, 0, (32, 32)))
                             for v in range(args.views) for i in range(len(ds))])
        teacher(views[: args.forward_block])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(views), args.batch_size):
            teacher(views[s : s + args.batch_size])
        infer = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = dump_logits(teacher=args.teacher, checkpoint=ckpt, dataset="digits", augment="cifar", views=args.views,
                    out=f"{tmp}/c.zarr", batch_size=args.batch_size, forward_block=args.forward_block, workers=args.workers,
                    device=args.device, progress=False)
        whole = time.perf_counter() - t0
    n = len(views)
    loop = summary.seconds
    print("| teacher | device | workers | views | inference only (views/s) | dump loop (views/s) | inference/dump loop | whole command (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.teacher} | {teacher.device} | {args.workers} | {n} | {n / infer:,.0f} | {n / loop:,.0f} | {infer / loop:.2f} | {whole:.1f} |")


if __name__ == "__main__":
    main()
