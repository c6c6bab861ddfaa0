"""Dump throughput against pure teacher inference on the same views, batch size and device, in one run.

(a) teacher forward alone over views built beforehand (pinned in memory on a
GPU host), in the same padded blocks; (b) the loop of ``dump_logits`` (views
built by DataLoader workers or a prefetch thread, teacher, buffered background
writes; the whole command adds start-up and the final per-view accuracy
pass); (c) a plain inference pass: the dump's loader and teacher over the
same views with nothing checked or stored. (a), (c) and (b) alternate
``--repeats`` times so load on a shared machine hits all alike; the table
reports the median of the per-round ratios a/b time, the share of the dump
spent on inference (the target is >= 0.95), and c/b, the share left after
paying for caching: a low a/b with a c/b near 1 means the views, not the
cache, hold the dump back.
Run: ``python bench/dump_throughput.py --teacher resnet8 --views 16 --workers 0``;
``--teacher`` takes a comma-separated list, one table row each. ``--samples N``
replaces the digits by a CIFAR-100-sized training set of N 32x32 images (shifted
digits, labels i % 100) written in the real ``cifar-100-python`` format, so
chunks hold 4,096 rows as they do on CIFAR-100. ``--ceiling`` also runs the dump
loop with a teacher that returns zeros at once (an infinitely fast device): the
most views/s this host's loop can feed, so a teacher whose inference-only rate
is below about 0.95 x that ceiling can meet the target here, and the loader
alone with that teacher: the most views/s the view builders deliver.
``--teacher null`` is a teacher that costs the device next to nothing (a
global average pool and one linear layer) but runs the real launch path:
pinned copies, on a GPU the CUDA graph replay and the copy back. Its dump
loop, next to the ``--ceiling`` loop, says what issuing work to the device
costs the loop; its a/b is not a target. ``--threads N`` calls
``torch.set_num_threads(N)`` on the thread that runs the dump loop.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from kdcache.dataset.datasets import ImageDataset, build_dataset
from kdcache.dump.chunks import ViewSet
from kdcache.dump.loop import DumpSummary, dump_logits, view_batches
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model
from kdcache.models.zoo import register
from kdcache.teacher.runner import LaunchedLogits, Teacher, load_teacher
from kdcache.views.recipes import Recipe, make_recipe


@register("null")
def null_teacher(num_classes: int) -> torch.nn.Module:
    """A teacher with almost no device work, for timing the loop's launch path (``--teacher null``)."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, num_classes))


def cifar_sized(root: Path, n: int) -> ImageDataset:
    """A ``cifar-100-python`` folder of ``n`` training images (digit i % 1438 shifted right by i // 1438 pixels), opened
    as cifar100."""
    digits = build_dataset("digits")
    images = np.stack([np.roll(digits.image(i % len(digits)), i // len(digits), axis=1) for i in range(n)])
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, x in (("train", images), ("test", images[:100])):
        labels = (np.arange(len(x)) % 100).tolist()
        with open(base / split, "wb") as f:
            pickle.dump(
                {
                    "data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),
                    "fine_labels": labels,
                    "coarse_labels": [c // 5 for c in labels],
                },
                f,
            )
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)]}, f)
    return build_dataset("cifar100", root)


@contextlib.contextmanager
def free_teacher(num_classes: int):
    """Within the block every teacher returns zero logits at once, so a dump measures its loop alone."""
    launch = Teacher.launch
    # numpy's zeros: torch's would run on its CPU thread pool, which stalls behind busy loader workers.
    Teacher.launch = lambda self, views: LaunchedLogits(
        torch.from_numpy(np.zeros((views.shape[0], num_classes), np.float32)), None
    )
    try:
        yield
    finally:
        Teacher.launch = launch


def plain_pass(
    ds: ImageDataset, recipe: Recipe, teacher: Teacher, items: np.ndarray, batch_size: int, workers: int
) -> float:
    """Seconds for a plain inference pass: the dump's own loader and teacher over the same views, nothing checked or
    stored.

    What a user's inference loop over these augmented views would cost; the
    dump loop's time beyond it is the price of caching (hashes, parameters,
    encoding, writing). Two batches stay in flight, as in the dump.
    """
    batches = view_batches(ViewSet(ds, recipe, 0, items, False), batch_size, workers, pin=teacher.device.type == "cuda")
    in_flight: deque = deque()
    t0 = time.perf_counter()
    for _, _, pix, _, _ in batches:
        in_flight.append(teacher.launch(pix[0]))
        if len(in_flight) > 2:
            in_flight.popleft().result()
    for launched in in_flight:
        launched.result()
    return time.perf_counter() - t0


def median_round(summaries: list[DumpSummary]) -> DumpSummary:
    """The round whose dump loop took the median time, for its stage breakdown."""
    return sorted(summaries, key=lambda x: x.seconds)[len(summaries) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="resnet8")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--forward-block", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--samples", type=int, default=0, help="CIFAR-100-sized stand-in with this many images (0: the digits)"
    )
    p.add_argument("--ceiling", action="store_true", help="also measure the loop with a teacher that costs nothing")
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads(N) on the dump loop's thread (0: torch's default)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = tmp_dir.name
    ds = cifar_sized(Path(tmp), args.samples) if args.samples else build_dataset("digits")
    recipe = make_recipe("cifar", True)
    v_idx, s_idx = np.repeat(np.arange(args.views), len(ds)), np.tile(np.arange(len(ds)), args.views)
    params = recipe.params_batch(0, v_idx, s_idx, 0, np.full((len(v_idx), 2), 32))
    views = recipe.apply_batch([ds.image(int(i)) for i in s_idx], params)
    n = len(views)
    items = np.stack([v_idx, s_idx], 1)
    rows, notes = [], []
    with tmp_dir:
        for name in args.teacher.split(","):
            ckpt = f"{tmp}/{name}.pth"
            torch.manual_seed(0)
            save_checkpoint(ckpt, create_model(name, ds.num_classes))
            teacher = load_teacher(
                name, ds.num_classes, ds.norm, ckpt, device=args.device, forward_block=args.forward_block, amp=args.amp
            )
            src = views.pin_memory() if teacher.device.type == "cuda" else views
            teacher(src[: args.forward_block])  # warm-up
            infer, plain, loop, whole, summaries = [], [], [], [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                for s in range(0, n, args.batch_size):
                    teacher(src[s : s + args.batch_size])
                infer.append(time.perf_counter() - t0)
                plain.append(plain_pass(ds, recipe, teacher, items, args.batch_size, args.workers))
                t0 = time.perf_counter()
                summary = dump_logits(
                    teacher=name,
                    checkpoint=ckpt,
                    dataset=ds.name,
                    data_root=tmp,
                    augment="cifar",
                    views=args.views,
                    out=f"{tmp}/{name}-{r}.zarr",
                    batch_size=args.batch_size,
                    forward_block=args.forward_block,
                    workers=args.workers,
                    device=args.device,
                    amp=args.amp,
                    progress=False,
                )
                whole.append(time.perf_counter() - t0)
                loop.append(summary.seconds)
                summaries.append(summary)
            ratios = [a / b for a, b in zip(infer, loop, strict=True)]
            rows.append(
                f"| {name} | {teacher.device} | {args.amp} | {args.workers} | {n} | "
                f"{n / statistics.median(infer):,.0f} | "
                f"{n / statistics.median(plain):,.0f} | {n / statistics.median(loop):,.0f} | "
                f"**{statistics.median(ratios):.2f}** "
                f"({', '.join(f'{x:.2f}' for x in ratios)}) | "
                f"{statistics.median(a / b for a, b in zip(plain, loop, strict=True)):.2f} | "
                f"{statistics.median(whole):.1f} |"
            )
            print(rows[-1], flush=True)
            mid = median_round(summaries)
            notes.append(f"{name}: {mid.where_time_went()} (the median round's {mid.seconds:.1f} s loop)")
            print(notes[-1], flush=True)
        if args.ceiling:
            rates, loader_rates, summaries = [], [], []
            with free_teacher(ds.num_classes):
                for r in range(args.repeats):
                    loader_rates.append(n / plain_pass(ds, recipe, teacher, items, args.batch_size, args.workers))
                    summary = dump_logits(
                        teacher=name,
                        checkpoint=ckpt,
                        dataset=ds.name,
                        data_root=tmp,
                        augment="cifar",
                        views=args.views,
                        out=f"{tmp}/free-{r}.zarr",
                        batch_size=args.batch_size,
                        forward_block=args.forward_block,
                        workers=args.workers,
                        device=args.device,
                        progress=False,
                    )
                    rates.append(n / summary.seconds)
                    summaries.append(summary)
            ceiling = (
                f"dump loop ceiling (teacher returning zeros, workers {args.workers}): median "
                f"{statistics.median(rates):,.0f} "
                f"views/s ({', '.join(f'{x:,.0f}' for x in rates)}); the loader alone: median "
                f"{statistics.median(loader_rates):,.0f} views/s; median round's loop: "
                f"{median_round(summaries).where_time_went()}"
            )
    print(
        "| teacher | device | amp | workers | views | inference only (views/s) | plain pass (views/s) | dump loop "
        "(views/s) | "
        "inference/dump loop (median; rounds) | plain pass/dump loop | whole command (s) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\nWhere each dump loop's time went (seconds of its main thread per stage):")
    print("\n".join(notes))
    if args.ceiling:
        print(ceiling)


if __name__ == "__main__":
    main()
