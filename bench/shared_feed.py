"""Memory of N concurrent students of one cache: private in-RAM copies against one shared scratch map.

Builds a synthetic float16 cache (the real layout: logits, params, view_hash;
Zstd(1), 4096-row chunks) and, for N = 1, 2, 4, starts N student processes at
once. Each opens a :class:`~kdcache.feed.logits.LogitFeed` over the same store, either
whole in RAM (``private``) or mapped from a scratch folder (``scratch``), reads
3 epochs as the trainer does (get, prefetch the next, gather batches of 128), waits until all N
have, then reports from ``/proc/self``: peak RSS (VmHWM), the peak of its
anonymous memory above what it had before the feed (sampled every 5 ms), the
PSS of its maps of the shared ``.npy`` files, and its USS/PSS (smaps_rollup).
A student's cache memory is its extra anonymous peak plus its share of the map;
the marginal cost of one more student is the growth of the N students' sum over
one student's, per added student. Ratios are to the cache's decompressed size.
Run with ``python bench/shared_feed.py`` (``--views``/``--samples`` to resize).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20
NAMES = ["logits", "params", "view_hash"]


def _kib(text: str, key: str) -> int:
    """Bytes of field ``key`` (a ``kB`` figure) in a /proc status or smaps text."""
    line = next(x for x in text.splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _anon() -> int:
    return _kib(Path("/proc/self/status").read_text(), "RssAnon")


def _map_pss() -> int:
    """PSS of this process's maps of the shared ``.npy`` files."""
    total, in_npy = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:  # a mapping's header line: range perms offset dev inode [path]
            in_npy = head[-1].endswith(".npy")
        elif in_npy and head[0] == "Pss:":
            total += int(head[1]) * 1024
    return total


def _meet(barrier: str, step: str, count: int) -> None:
    """Wait until all ``count`` students have reached ``step``."""
    Path(barrier, f"{step}-{os.getpid()}").touch()
    while len(list(Path(barrier).glob(f"{step}-*"))) < count:
        time.sleep(0.02)


def make_store(path: Path, views: int, samples: int, classes: int) -> int:
    """A synthetic cache at ``path``; returns the decompressed bytes of the arrays a feed reads."""
    from kdcache.store.cache import create_store

    store = create_store(
        path,
        num_views=views,
        labels=np.zeros(samples, np.int64),
        num_classes=classes,
        dtype="float16",
        kinds=1,
        param_fields=[["top", "left", "flip"]],
        attrs={},
    )
    rng = np.random.default_rng(0)
    for v in range(views):
        store.group["logits"][v] = (rng.standard_normal((samples, classes)) * 3).astype(np.float16)
        store.group["params"][v] = rng.integers(0, 9, size=(samples, 3)).astype(np.float32)
        store.group["view_hash"][v] = rng.integers(0, 2**63, size=samples, dtype=np.uint64)
    return sum(int(np.prod(store.group[n].shape)) * store.group[n].dtype.itemsize for n in NAMES)


def student(store_path: str, mode: str, scratch: str, barrier: str, count: int) -> dict[str, int]:
    """One student: 3 epochs through a feed, then its memory figures once all ``count`` students are done."""
    from kdcache.feed.logits import LogitFeed, epoch_order, epoch_views
    from kdcache.store.cache import open_store

    store = open_store(store_path)
    base, peak, done = _anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    feed = LogitFeed(store, NAMES, 1 << 40, scratch=scratch if mode == "scratch" else None)
    n, v = store.num_samples, store.num_views
    for epoch in range(3):
        rows = feed.get(epoch, epoch_views(0, epoch, n, v, uniform=False))
        if epoch < 2:
            feed.prefetch(epoch + 1, epoch_views(0, epoch + 1, n, v, uniform=False))
        order = epoch_order(0, epoch, n)
        for s in range(0, n, 128):  # the trainer's per-batch gathers, in the epoch's order
            batch = {name: a[order[s : s + 128]] for name, a in rows.items()}
        del rows, batch
    _meet(barrier, "read", count)
    done.set()
    rollup = Path("/proc/self/smaps_rollup").read_text()
    uss = _kib(rollup, "Private_Clean") + _kib(rollup, "Private_Dirty")
    status = Path("/proc/self/status").read_text()
    report = {
        "hwm": _kib(status, "VmHWM"),
        "anon": max(peak[0], _anon()) - base,
        "map_pss": _map_pss(),
        "pss": _kib(rollup, "Pss"),
        "uss": uss,
    }
    _meet(barrier, "measured", count)  # nobody unmaps before all have measured their share
    return report


def run(store: Path, mode: str, count: int, tmp: Path) -> list[dict[str, int]]:
    """``count`` students started together; their reports."""
    scratch, barrier = tmp / f"scratch-{mode}-{count}", tmp / f"barrier-{mode}-{count}"
    barrier.mkdir()
    cmd = [sys.executable, __file__, "--student", str(store), mode, str(scratch), str(barrier), str(count)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    out = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a student failed ({mode}, {count})")
    return out


def table(results: dict[tuple[str, int], list[dict[str, int]]], size: int) -> str:
    """The markdown table of per-student means and the marginal cost of one more student."""
    cost = {k: sum(r["anon"] + r["map_pss"] for r in rs) for k, rs in results.items()}
    lines = [
        "| feed | students | peak RSS MiB | peak extra anon MiB | map PSS MiB | USS MiB | PSS MiB "
        "| cache memory / cache | per added student / cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, n), rs in results.items():
        mean = {k: np.mean([r[k] for r in rs]) / MIB for k in rs[0]}
        added = f"{(cost[mode, n] - cost[mode, 1]) / (n - 1) / size:.3f}" if n > 1 else "–"
        lines.append(
            f"| {mode} | {n} | {mean['hwm']:.0f} | {mean['anon']:.1f} | {mean['map_pss']:.1f} | {mean['uss']:.0f} "
            f"| {mean['pss']:.0f} | {cost[mode, n] / n / size:.3f} | {added} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=32)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--tmp", default=None, help="folder for the store and scratch (default: a temporary one)")
    p.add_argument("--student", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.student:
        store, mode, scratch, barrier, count = args.student
        print(json.dumps(student(store, mode, scratch, barrier, int(count))))
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        size = make_store(Path(tmp, "c.zarr"), args.views, args.samples, args.classes)
        results = {(m, n): run(Path(tmp, "c.zarr"), m, n, Path(tmp)) for m in ("private", "scratch") for n in (1, 2, 4)}
    print(f"`python bench/shared_feed.py --views {args.views} --samples {args.samples} --classes {args.classes}`")
    print(f"cache: {args.views} views x {args.samples} samples x {args.classes} classes float16, {size / MIB:.0f} MiB")
    print(f"decompressed ({', '.join(NAMES)}); 3 epochs per student, chunk view schedule\n")
    print(table(results, size))


if __name__ == "__main__":
    main()
