"""Stage two's side of the cache: which stored view each sample uses per epoch, and its logits in RAM.

The view schedule and the sample order are counter-based functions of
(seed, epoch, sample), so a cached run and an online run draw the same views in
the same order, and a resumed run draws what the uninterrupted run would have.
Teacher logits are never read from Zarr per batch: :class:`LogitFeed` gathers
the rows an epoch needs with whole-chunk contiguous reads (or keeps the whole
cache in RAM when it fits) on a background thread and prefetches the next epoch.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.store import CHUNK, CacheStore

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
TAG_VIEW, TAG_ORDER, TAG_PERM = 0x5649, 0x4F52, 0x5045


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """A byte count from ``4GiB``, ``512MiB``, ``2GB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match[2].lower()
    if match is None or unit not in _UNITS:
        raise KdcacheError(f"--cache-memory takes a size such as 512MiB, 4GiB or 2GB, not {text!r}")
    return int(float(match[1]) * _UNITS[unit])


def mix64(*parts: int | np.ndarray) -> np.ndarray:
    """A counter-based 64-bit hash (splitmix64 finalizer chained over the parts), vectorized over arrays."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for p in parts:
            x = (h ^ np.asarray(p, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * _M1
            x = (x ^ (x >> np.uint64(27))) * _M2
            h = x ^ (x >> np.uint64(31))
        return h


#: How a seeded cache's views are scheduled: ``chunk`` (every sample of a store chunk takes the same view index in an
#: epoch, so an epoch reads one view's worth of the cache) or ``sample`` (each sample its own permutation; runs
#: started before the chunk schedule keep it).
SCHEDULES = ("chunk", "sample")


def epoch_views(
    seed: int, epoch: int, num_samples: int, num_views: int, uniform: bool, schedule: str = "chunk"
) -> np.ndarray:
    """The stored view index each sample uses in 0-based ``epoch``.

    ``uniform`` (a cache of every view, ``--views all``, where view ``v`` is
    the same crop for every sample) draws uniformly at random per sample and
    epoch, like online augmentation. Otherwise views are drawn without
    replacement across epochs: each sample sees every stored view once per
    cycle of ``num_views`` epochs, then a fresh permutation starts. With the
    ``chunk`` schedule the permutation belongs to the sample's chunk of
    :data:`~kdcache.store.CHUNK` rows. Seeded view ``v`` of different samples
    are independent draws, so sharing the index changes no statistics, and
    an epoch then reads one chunk per chunk instead of one per view drawn.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown view schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    i = np.arange(num_samples, dtype=np.uint64)
    if uniform:
        return (mix64(seed, TAG_VIEW, epoch, i) % np.uint64(num_views)).astype(np.int64)
    cycle, pos = divmod(epoch, num_views)
    owners = np.arange(-(-num_samples // CHUNK), dtype=np.uint64) if schedule == "chunk" else i
    keys = mix64(seed, TAG_PERM, cycle, owners[:, None], np.arange(num_views, dtype=np.uint64)[None, :])
    views = np.argsort(keys, axis=1, kind="stable")[:, pos].astype(np.int64)
    return np.repeat(views, CHUNK)[:num_samples] if schedule == "chunk" else views


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The shuffled sample order of 0-based ``epoch``."""
    return np.argsort(mix64(seed, TAG_ORDER, epoch, np.arange(num_samples, dtype=np.uint64)), kind="stable")


def reuse_warning(epochs: int, num_views: int, uniform: bool) -> str | None:
    """A warning when a run has more epochs than stored views (views get reused)."""
    if uniform or epochs <= num_views:
        return None
    return (
        f"the cache holds {num_views} views per sample but the run has {epochs} epochs: "
        f"{epochs - num_views} epochs reuse views already seen (dump more with a larger --views)"
    )


def gather_rows(store: CacheStore, name: str, views: np.ndarray, start: int = 0) -> np.ndarray:
    """``out[j] = store[name][views[j], start + j]`` using only whole-chunk contiguous reads of rows ``start .. start +
    len(views)``."""
    arr = store.group[name]
    end = start + len(views)
    out = np.empty((len(views), *arr.shape[2:]), dtype=arr.dtype)
    for v in np.unique(views):
        js = np.flatnonzero(views == v)
        rows = js + start
        for c in np.unique(rows // CHUNK):
            lo, hi = max(int(c) * CHUNK, start), min(end, (int(c) + 1) * CHUNK)
            sel = js[(rows >= lo) & (rows < hi)]
            block = np.asarray(arr[int(v), lo:hi])
            out[sel] = block[sel + start - lo]
    return out


class LogitFeed:
    """Per-epoch arrays (logits, parameters, hashes) of the views an epoch uses, prefetched on a thread.

    Only the sample rows ``rows = (lo, hi)`` are ever read (a torchrun rank's
    shard; all rows by default), and arrays come back indexed by ``sample - lo``.
    If every view of those rows fits in ``memory_bytes`` they are read once,
    whole, and each epoch is an in-RAM gather.
    """

    def __init__(
        self, store: CacheStore, names: list[str], memory_bytes: int = 4 << 30, rows: tuple[int, int] | None = None
    ):
        self.store, self.names = store, names
        self.lo, self.hi = rows if rows is not None else (0, store.num_samples)
        share = (self.hi - self.lo) / max(store.num_samples, 1)
        size = sum(int(np.prod(store.group[n].shape)) * store.group[n].dtype.itemsize for n in names) * share
        self.whole = size <= memory_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-feed")
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._full: dict[str, np.ndarray] | None = None

    def _load(self, views: np.ndarray) -> dict[str, np.ndarray]:
        try:
            rows = self._read(views)
        except Exception:
            for name in self.names:
                try:
                    self.store.group[name][...]
                except Exception:
                    raise self.store.locate_corruption(name) from None
            raise
        for name, a in rows.items():
            if a.dtype.kind == "f" and not (finite := np.isfinite(a.reshape(len(a), -1)).all(axis=1)).all():
                j = int(np.flatnonzero(~finite)[0])
                raise KdcacheError(
                    f"cache {self.store.location}: {name} of sample {self.lo + j}, view {int(views[j])} is not finite "
                    f"(chunk {(self.lo + j) // CHUNK} holds no data): run `kdcache verify` on it and dump it again"
                )
        return rows

    def _read(self, views: np.ndarray) -> dict[str, np.ndarray]:
        if self.whole:
            if self._full is None:
                self._full = {n: np.asarray(self.store.group[n][:, self.lo : self.hi]) for n in self.names}
            idx = np.arange(len(views))
            return {n: a[views, idx] for n, a in self._full.items()}
        return {n: gather_rows(self.store, n, views, self.lo) for n in self.names}

    def prefetch(self, epoch: int, views: np.ndarray) -> None:
        """Start loading ``epoch``'s rows in the background (no-op if already started); ``views`` covers rows lo..hi."""
        with self._lock:
            if epoch not in self._pending:
                self._pending[epoch] = self._pool.submit(self._load, views)

    def get(self, epoch: int, views: np.ndarray) -> dict[str, np.ndarray]:
        """``epoch``'s rows by array name, waiting for the background load if needed."""
        self.prefetch(epoch, views)
        with self._lock:
            fut = self._pending.pop(epoch)
        return fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
