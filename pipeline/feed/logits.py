"""Stage two's side of the cache: which stored view each sample uses per epoch, and its logits in RAM.

The view schedule and the sample order are counter-based functions of
(seed, epoch, sample), so a cached run and an online run draw the same views in
the same order, and a resumed run draws what the uninterrupted run would have.
Teacher logits are never read from Zarr per batch: :class:`LogitFeed` gathers
the rows an epoch needs with whole-chunk contiguous reads (or keeps the whole
cache in RAM when it fits) on a background thread and prefetches the next epoch.

With a scratch folder, the whole cache is instead a set of decompressed ``.npy``
files that every student on the machine memory-maps read-only, so N concurrent
students share one copy in the page cache (:func:`shared_files`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from kdcache.errors import KdcacheError, first_line
from kdcache.settings import choices
from kdcache.store.cache import CHUNK, CacheStore, local_path, open_array
from kdcache.store.locations import local_folder

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
TAG_VIEW, TAG_ORDER, TAG_PERM = 0x5649, 0x4F52, 0x5045


def mix64(*parts: int | np.ndarray) -> np.ndarray:
    """A counter-based 64-bit hash (splitmix64 finalizer chained over the parts), vectorized over arrays."""
    with np.errstate(over="ignore"):
        h = np.asarray(np.uint64(0x9E3779B97F4A7C15))
        for p in parts:
            x = (h ^ np.asarray(p, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * _M1
            x = (x ^ (x >> np.uint64(27))) * _M2
            h = x ^ (x >> np.uint64(31))
        return h


#: How a seeded cache's views are scheduled: ``chunk`` (every sample of a store chunk takes the same view index in an
#: epoch, so an epoch reads one view's worth of the cache) or ``sample`` (each sample its own permutation; runs
#: started before the chunk schedule keep it).
SCHEDULES = choices("view_schedule")


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
    :data:`~kdcache.store.cache.CHUNK` rows. Seeded view ``v`` of different samples
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
        f"{epochs - num_views} {'epoch reuses' if epochs - num_views == 1 else 'epochs reuse'} views already seen "
        "(dump more with a larger --views)"
    )


def gather_rows(store: CacheStore, name: str, views: np.ndarray, start: int = 0) -> np.ndarray:
    """``out[j] = store[name][views[j], start + j]`` using only whole-chunk contiguous reads of rows ``start .. start +
    len(views)``."""
    arr = open_array(store.group, name)
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


SCRATCH_LOCK = ".kdcache-scratch.lock"


def check_scratch(scratch: str | Path) -> Path:
    """The scratch folder (created if absent), refused in one line when it is a file or cannot be written."""
    return local_folder(Path(scratch), "--cache-scratch", ", or leave it out")


def shared_files(store: CacheStore, names: list[str], scratch: Path) -> dict[str, Path]:
    """Per array, its decompressed file in ``scratch``, named by a sha256 of the cache's identity.

    The key is the store's resolved location, the array's name, shape, dtype and
    metadata file time (a local store re-dumped in place rewrites it), the store
    attributes (``created``, ``complete``, the teacher's accuracy...) and its
    ``done`` record, so a re-dumped, extended or different cache never maps a
    stale file.
    """
    root = local_path(store.location)
    base = {
        "location": str(root.resolve()) if root is not None else store.location,
        "attrs": store.attrs,
        "done": hashlib.sha256(store.done().tobytes()).hexdigest(),
    }
    out = {}
    for name in names:
        arr = open_array(store.group, name)
        meta = root / name / "zarr.json" if root is not None else None
        mtime = meta.stat().st_mtime_ns if meta is not None and meta.is_file() else None
        key = {**base, "array": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "meta_mtime_ns": mtime}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        out[name] = scratch / f"kdcache-{digest}-{name}.npy"
    return out


@contextmanager
def _scratch_lock(scratch: Path) -> Iterator[bool]:
    """Hold the scratch folder's lock (one decompression at a time); yields False where the filesystem has no locks.

    The kernel drops the lock when its holder dies, so a temp file found while
    holding it was left by an interrupted writer.
    """
    fd = os.open(scratch / SCRATCH_LOCK, os.O_CREAT | os.O_RDONLY, 0o644)  # read-only: another user's lock will do
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # no locks here: every process writes its own temp file and the last rename wins
            locked = False
        yield locked
    finally:
        os.close(fd)


def _blocks(arr: zarr.Array) -> Iterator[np.ndarray]:
    """``arr`` in C order, one stored chunk (a view's CHUNK rows) at a time: decompressing needs one chunk of RAM."""
    for v in range(arr.shape[0]):
        for lo in range(0, arr.shape[1], CHUNK):
            yield np.asarray(arr[v, lo : lo + CHUNK])


def _write_npy(arr: zarr.Array, path: Path) -> None:
    """Decompress ``arr`` into ``path`` through a fsynced temp file in the same folder and an atomic rename, so the
    final name only ever holds a whole file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": tuple(arr.shape)}
    try:
        with open(tmp, "xb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for block in _blocks(arr):
                f.write(np.ascontiguousarray(block).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise KdcacheError(
            f"--cache-scratch {path.parent}: cannot write {path.name} ({exc.strerror}): free space there or choose "
            "another folder"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def map_shared(arr: zarr.Array, path: Path) -> np.ndarray:
    """``arr`` as a read-only memory map of ``path``, decompressed there first by whichever process gets the lock."""
    if not path.exists():
        with _scratch_lock(path.parent) as locked:
            if locked:  # writers hold the lock, so any temp file now is an interrupted one
                for stale in path.parent.glob("kdcache-*.npy.*.tmp"):
                    stale.unlink(missing_ok=True)
            if not path.exists():
                _write_npy(arr, path)
    try:
        return np.asarray(np.load(path, mmap_mode="r"))
    except ValueError as exc:  # only a file changed after its rename gets here
        raise KdcacheError(
            f"--cache-scratch {path.parent}: {path.name} is damaged ({first_line(exc)}): delete it and run again"
        ) from None


def _fits(paths: dict[str, Path], store: CacheStore, scratch: Path) -> bool:
    """Whether the shared files not yet written fit in the scratch disk's free space (a warning when not)."""
    arrays = {n: open_array(store.group, n) for n, p in paths.items() if not p.exists()}
    need = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays.values())
    free = shutil.disk_usage(scratch).free
    if need > free:
        warnings.warn(
            f"--cache-scratch {scratch} has {free / 2**30:.1f} GiB free but the shared cache needs {need / 2**30:.1f} "
            "GiB: streaming chunks from the store instead (free space there or choose another folder)",
            stacklevel=3,
        )
    return need <= free


class LogitFeed:
    """Per-epoch arrays (logits, parameters, hashes) of the views an epoch uses, prefetched on a thread.

    Only the sample rows ``rows = (lo, hi)`` are ever read (a torchrun rank's
    shard; all rows by default), and arrays come back indexed by ``sample - lo``;
    only the first ``views`` views (all by default) are ever drawn. If those
    views of those rows fit in ``memory_bytes`` they are read once, whole, and
    each epoch is an in-RAM gather. A remote cache is always read an epoch at a
    time, so a run fetches only the chunks it draws (``scratch`` applies to local caches only: a
    remote one's files are shared on disk by the read-through folder).

    With ``scratch`` (a folder on a local disk) the whole cache is instead one
    decompressed ``.npy`` file per array there, memory-mapped read-only, so every
    student and rank on the machine shares one copy in the page cache. A file
    holds the whole array (every view and sample, whatever ``rows``), so ranks of
    any shard and runs of any budget map the same file; ``memory_bytes`` does not
    apply to it (the kernel may evict its pages), only free space on the scratch
    disk does: when the files do not fit, the feed streams chunks (with a warning).
    Each epoch's gathered rows are still private copies, checked for non-finite
    values as before.
    """

    def __init__(
        self,
        store: CacheStore,
        names: list[str],
        memory_bytes: int = 4 << 30,
        rows: tuple[int, int] | None = None,
        scratch: str | Path | None = None,
        views: int | None = None,
    ):
        self.store, self.names = store, names
        self.lo, self.hi = rows if rows is not None else (0, store.num_samples)
        self.views = views  # only the first ``views`` views are ever drawn (``--cache-views``)
        self.shared: dict[str, Path] | None = None
        if scratch is not None and local_path(store.location) is not None:
            folder = check_scratch(scratch)
            self.shared = shared_files(store, names, folder)
            self.whole = _fits(self.shared, store, folder)
        elif local_path(store.location) is None:
            self.whole = False  # a remote cache: each epoch fetches only the chunks it draws (then kept on disk)
        else:
            share = (self.hi - self.lo) / max(store.num_samples, 1)
            opened = [open_array(store.group, n) for n in names]
            used = [min(views or a.shape[0], a.shape[0]) / max(a.shape[0], 1) for a in opened]
            size = sum(int(np.prod(a.shape)) * a.dtype.itemsize * u for a, u in zip(opened, used, strict=True)) * share
            self.whole = size <= memory_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-feed")
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._full: dict[str, np.ndarray] | None = None

    def _load(self, views: np.ndarray) -> dict[str, np.ndarray]:
        try:
            rows = self._read(views)
        except KdcacheError:  # the scratch folder's, already described
            raise
        except Exception:
            for name in self.names:
                try:
                    open_array(self.store.group, name)[...]
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
                self._full = {n: self._whole_rows(n) for n in self.names}
            idx = np.arange(len(views))
            return {n: a[views, idx] for n, a in self._full.items()}
        return {n: gather_rows(self.store, n, views, self.lo) for n in self.names}

    def _whole_rows(self, name: str) -> np.ndarray:
        """Every view of rows lo..hi of ``name``: a view of the shared map, or a private in-RAM copy."""
        arr = open_array(self.store.group, name)
        if self.shared is not None:
            return map_shared(arr, self.shared[name])[:, self.lo : self.hi]
        return np.asarray(arr[: self.views, self.lo : self.hi])

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
        self._pool.shutdown(wait=True, cancel_futures=True)  # a read already running ends before close returns
