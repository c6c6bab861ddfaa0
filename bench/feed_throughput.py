"""Logit feed throughput: samples/s that stage two's feed delivers from a cache, on one core.

Builds a synthetic float16 cache (views x samples x classes, Zstd(1), 4096-row
chunks, the real layout) and measures one epoch as the trainer sees it:
``LogitFeed.get`` (whole-chunk reads of the drawn views, or the in-RAM gather
when the cache fits) plus the per-batch row gather. Run with
``taskset -c 0 python bench/feed_throughput.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from kdcache.feed.logits import LogitFeed, epoch_order, epoch_views
from kdcache.store.cache import create_store


def run(classes: int, samples: int, views: int, batch: int, memory: int) -> float:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = create_store(
            f"{tmp}/c.zarr",
            num_views=views,
            labels=np.zeros(samples, np.int64),
            num_classes=classes,
            dtype="float16",
            kinds=1,
            param_fields=[[]],
            attrs={},
        )
        for v in range(views):
            store.group["logits"][v] = (rng.standard_normal((samples, classes)) * 3).astype(np.float16)
        feed = LogitFeed(store, ["logits"], memory)
        best = 0.0
        for epoch in range(3):
            t0 = time.perf_counter()
            rows = feed.get(epoch, epoch_views(0, epoch, samples, views, False))["logits"]
            order = epoch_order(0, epoch, samples)
            for s in range(0, samples, batch):
                torch.from_numpy(rows[order[s : s + batch]]).float()
            best = max(best, samples / (time.perf_counter() - t0))
        feed.close()
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| classes | samples | views | cache in RAM | samples/s |")
    print("|---:|---:|---:|---|---:|")
    for classes, samples in ((100, 50_000), (1000, 100_000)):
        for memory, label in ((1 << 40, "yes"), (0, "no (chunk reads per epoch)")):
            rate = run(classes, samples, 4, args.batch, memory)
            print(f"| {classes} | {samples} | 4 | {label} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
