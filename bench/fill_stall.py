"""Host-side cost of deterministic mode's memory fill on a loaded machine, fill on against fill off, in one run.

With ``torch.use_deterministic_algorithms(True)`` (kdcache's setting on a GPU)
PyTorch fills every tensor that ``torch.empty`` and friends allocate with NaN,
including the output of ``.to()`` and ``.clone()``. On a CPU tensor the fill
runs on torch's thread pool, so while other processes keep cores busy (a
dump's loader workers) it waits for a descheduled pool thread. The dump's
launch path copies every block's logits back with ``.to("cpu",
non_blocking=True)``, one such fill per block. This bench times that call
for a block of logits, with ``--busy`` processes spinning on matrix products,
alternating the fill on and off ``--repeats`` times, and reports the median,
90th percentile and worst call.
Run: ``python bench/fill_stall.py --busy 1`` (``--device cuda`` times the real
GPU-to-pinned-host copy; on a CPU, where a copy would add its own thread-pool
work, the allocation inside it stands in).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch


def spin(stop: mp.synchronize.Event) -> None:
    """Keep one core busy, as a loader worker building views does."""
    a = np.random.default_rng(0).random((1024, 1024))
    while not stop.is_set():
        a @ a


def time_calls(fn, calls: int) -> list[float]:
    """Seconds per call of ``fn``, with a short pause between calls as between a dump's blocks."""
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        time.sleep(0.002)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--busy", type=int, default=1, help="processes spinning on matrix products")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.device == "cuda":
        src = torch.randn(args.block, args.classes, device="cuda")

        def call() -> None:
            src.to("cpu", non_blocking=True)
            torch.cuda.current_stream().synchronize()
        what = "GPU logits .to('cpu', non_blocking=True) + sync"
    else:
        src = torch.randn(args.block, args.classes)

        def call() -> None:
            torch.empty_like(src)
        what = "torch.empty_like(CPU logits), the allocation inside .to()"
    stop = mp.Event()
    procs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for proc in procs:
        proc.start()
    time.sleep(1.0)
    torch.use_deterministic_algorithms(True)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(args.repeats):
            for fill in (True, False):
                torch.utils.deterministic.fill_uninitialized_memory = fill
                times[fill] += time_calls(call, args.calls)
    finally:
        stop.set()
        for proc in procs:
            proc.join()
    print(f"{what}, block {args.block} x {args.classes}, {args.busy} busy processes, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} x {args.calls} calls each:")
    print("| fill | median (us) | p90 (us) | worst (ms) |\n|---|---:|---:|---:|")
    for fill in (True, False):
        t = np.asarray(times[fill]) * 1e6
        print(f"| {'on' if fill else 'off'} | {statistics.median(t):,.0f} | {np.percentile(t, 90):,.0f} | {t.max() / 1e3:.1f} |")


if __name__ == "__main__":
    main()
