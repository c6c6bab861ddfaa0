"""Host work of the dump's launch path on torch's CPU thread pool, beside busy processes: the old way against kdcache's.

A GPU dump's main thread does little CPU work per forward block, but any of it
that runs on torch's CPU thread pool waits for every pool thread it wakes; with
loader workers keeping cores busy, one of them is often descheduled and the
call takes milliseconds instead of microseconds. Two such calls were in the
launch path:

- ``alloc``: the allocation of each block's logits on the host. Deterministic
  mode (kdcache's setting on a GPU) fills every new tensor with NaN, on the
  pool; kdcache now turns the fill off. Timed: ``torch.empty_like`` of a block
  of logits, fill on against off (``--device cuda``: the real
  ``.to("cpu", non_blocking=True)`` of GPU logits and a sync).
- ``join``: joining two loader batches into one block of pixels (a block that
  spans batches). ``torch.cat`` runs on the pool; kdcache now joins with
  numpy (into page-locked memory on a GPU host, so the copy to the GPU stays
  asynchronous).

Each case alternates old and new ``--repeats`` times, ``--calls`` calls each
with a 2 ms pause between calls as between blocks, while ``--busy`` processes
spin on matrix products, and reports the median, 90th percentile and worst call.
Run: ``python bench/pool_stall.py --busy 1``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from kdcache.dump.loop import join_pixels


def spin(stop: mp.synchronize.Event) -> None:
    """Keep one core busy, as a loader worker building views does."""
    a = np.random.default_rng(0).random((1024, 1024))
    while not stop.is_set():
        a @ a


def time_calls(fn: Callable[[], object], calls: int) -> list[float]:
    """Seconds per call of ``fn``, with a short pause between calls."""
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        time.sleep(0.002)
    return out


def set_fill(on: bool) -> None:
    torch.utils.deterministic.fill_uninitialized_memory = on


def cases(args: argparse.Namespace) -> dict[str, tuple[tuple[str, Callable[[], None], Callable[[], object]], ...]]:
    """Per case, (label, set-up, call) for the old way and kdcache's."""
    cuda = args.device == "cuda"
    logits = torch.randn(args.block, args.classes, device=args.device)
    if cuda:

        def alloc() -> object:
            logits.to("cpu", non_blocking=True)
            torch.cuda.current_stream().synchronize()
            return None
    else:

        def alloc() -> object:
            return torch.empty_like(logits)

    half = args.block // 2
    gen = torch.Generator().manual_seed(0)
    parts = [
        torch.randint(0, 256, (1, n, 3, args.size, args.size), dtype=torch.uint8, generator=gen)
        for n in (half, args.block - half)
    ]
    if cuda:
        parts = [p.pin_memory() for p in parts]
    return {
        "alloc": (("fill on", lambda: set_fill(True), alloc), ("fill off", lambda: set_fill(False), alloc)),
        "join": (
            ("torch.cat", lambda: set_fill(False), lambda: torch.cat(parts, 1)),
            ("numpy" + (" into pinned" if cuda else ""), lambda: set_fill(False), lambda: join_pixels(parts, cuda)),
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=1, help="processes spinning on matrix products")
    p.add_argument("--block", type=int, default=512, help="views per forward block")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32, help="view side in pixels")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.use_deterministic_algorithms(True)
    todo = cases(args)
    stop = mp.Event()
    procs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for proc in procs:
        proc.start()
    time.sleep(1.0)
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.repeats):
            for case, ways in todo.items():
                for label, setup, call in ways:
                    setup()
                    times.setdefault((case, label), []).extend(time_calls(call, args.calls))
    finally:
        stop.set()
        for proc in procs:
            proc.join()
    print(
        f"device {args.device}, block {args.block} ({args.classes} classes, {args.size}x{args.size} views), "
        f"{args.busy} busy "
        f"processes, torch threads {torch.get_num_threads()}, {args.repeats} x {args.calls} calls per way:"
    )
    print("| case | way | median (us) | p90 (us) | worst (ms) |\n|---|---|---:|---:|---:|")
    for (case, label), t in times.items():
        us = np.asarray(t) * 1e6
        print(
            f"| {case} | {label} | {statistics.median(us):,.0f} | {np.percentile(us, 90):,.0f} | {us.max() / 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
