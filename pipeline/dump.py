"""Stage one: run a teacher over replayable views and write its logits into a Zarr cache.

The work unit is a chunk: one view index x :data:`~kdcache.store.CHUNK`
samples. DataLoader workers build the views (uint8, CPU); the teacher runs in
fixed padded blocks; rows are buffered into whole chunks and handed to a
background writer (a child process for local stores on Linux, else a thread),
which writes logits, parameters and pixel hashes and only then marks the chunk
done, so the teacher never waits on storage. A re-run skips done chunks, so an interrupted
dump resumes and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata as md
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from tqdm import tqdm

from kdcache import __version__
from kdcache.data import ImageDataset, build_dataset
from kdcache.errors import KdcacheError
from kdcache.store import (
    CHUNK,
    CacheStore,
    array_names,
    check_writable_location,
    create_store,
    disk_bytes,
    extend_views,
    identity_mismatch,
    local_path,
    num_chunks,
    open_store,
    remove_store,
    store_exists,
    writer_lock,
)
from kdcache.teacher import Teacher, load_teacher
from kdcache.topk import LogitFormat, encode, parse_format
from kdcache.views import Recipe, make_recipe, pixel_hashes

DTYPES = ("float16", "float32")
FLOAT16_MAX = 65504.0
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15  # prctl(2) options


def parse_views(views: str | int, recipe: Recipe) -> tuple[int, str]:
    """``--views`` as (number of views, mode): ``all`` enumerates a finite view space, ``N`` seeds N views."""
    if str(views) == "all":
        n = recipe.num_discrete_views
        if n is None:
            what = f"recipe {recipe.name!r}" + (f" with --mix {recipe.mix}" if recipe.mix != "none" else "")
            raise KdcacheError(f"--views all needs a finite view space; {what} is continuous: pass --views N")
        return n, "all" if recipe.name == "cifar" else "seeded"
    try:
        n = int(views)
    except ValueError:
        raise KdcacheError(f"--views must be a positive integer or 'all', got {views!r}") from None
    if n < 1:
        raise KdcacheError(f"--views must be at least 1, got {n}")
    if recipe.name == "none" and n != 1:
        raise KdcacheError("--augment none has exactly one view: pass --views 1")
    return n, "seeded"


class ViewSet(Dataset):
    """Batches of (view, sample) pairs: uint8 pixels, float32 parameters and pixel hashes per kind.

    Indexed by a list of item positions (the loader's batch sampler), so the
    parameters come from one vectorized generator call and 32x32 crops from
    one batched copy instead of per-view Python work. A batch is
    ``(views, samples, pixels, params, hashes)``: ``pixels`` is one uint8
    tensor of shape (kinds, n, C, H, W), the rest are numpy arrays (``params``
    and ``hashes`` one per kind). From a DataLoader worker only the pixel
    tensor travels through shared memory; each shared tensor costs a socket
    handshake with the worker, which waits on that busy worker's GIL, while
    the small arrays ride along in the pickle.
    """

    def __init__(self, dataset: ImageDataset, recipe: Recipe, seed: int, items: np.ndarray, all_views: bool):
        self.dataset, self.recipe, self.seed, self.items, self.all_views = dataset, recipe, seed, items, all_views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(
        self, ks: list[int]
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, list[np.ndarray], list[np.ndarray]]:
        v, i = self.items[ks, 0], self.items[ks, 1]
        images = [self.dataset.image(int(s)) for s in i]
        hw = np.asarray([im.shape[:2] for im in images], dtype=np.int64)
        pixels, params, hashes = [], [], []
        partners = partner_images = partner_hw = None
        if self.recipe.mix != "none":
            partners = self.recipe.partners(self.seed, v, i, len(self.dataset))
            partner_images = [self.dataset.image(int(j)) for j in partners]
            partner_hw = np.asarray([im.shape[:2] for im in partner_images], dtype=np.int64)
        for kind in range(len(self.recipe.kinds)):
            p = self.recipe.params_batch(self.seed, v, i, kind, hw, self.all_views, partners, partner_hw)
            x = self.recipe.apply_batch(images, p, kind, partner_images)
            pixels.append(x)
            params.append(p)
            hashes.append(pixel_hashes(x))
        return v, i, torch.stack(pixels) if len(pixels) > 1 else pixels[0][None], params, hashes


def as_is(batch: tuple) -> tuple:
    """The DataLoader's collate for :class:`ViewSet`: its default would turn the numpy arrays back into shared
    tensors."""
    return batch


@dataclass
class DumpSummary:
    """What a dump produced: shown at the end of the command and returned to Python callers."""

    location: str
    num_views: int
    num_samples: int
    num_classes: int
    written_chunks: int
    teacher_top1: list[float]
    disk_bytes: int | None
    seconds: float
    samples_per_second: float
    notes: list[str] = field(default_factory=list)
    #: seconds of the dump loop's thread per stage (``views``, ``teacher``, ``gpu_wait``, ``rows``, ``writer``);
    #: empty for a distributed dump or when there was nothing to do
    stages: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        top = np.asarray(self.teacher_top1) * 100
        out = [
            f"cache     {self.location}",
            f"views     {self.num_views}  samples {self.num_samples}  classes {self.num_classes}",
            f"written   {self.written_chunks} chunks in {self.seconds:.1f} s ({self.samples_per_second:,.0f} views/s)",
        ]
        if len(top):
            out.append(f"teacher   top-1 per view mean {top.mean():.2f}%  range {top.min():.2f}-{top.max():.2f}%")
        if self.disk_bytes is not None:
            per = self.disk_bytes / max(1, self.num_views * self.num_samples)
            out.append(f"on disk   {self.disk_bytes / 2**20:.1f} MiB  ({per:.1f} B per view-sample)")
        if self.stages:
            out.append(f"loop      {self.where_time_went()}")
        return out + self.notes

    def where_time_went(self) -> str:
        """Seconds of a single-process dump loop per stage (:attr:`stages`), and which one held it back."""
        s = self.stages
        spent = "  ".join(f"{k} {v:.2f} s" for k, v in s.items())
        parts = {"views": s["views"], "teacher": s["teacher"] + s["gpu_wait"], "rows": s["rows"], "writer": s["writer"]}
        worst = max(parts, key=parts.get)
        return (
            spent
            + ": "
            + {
                "views": "waiting for views most (raise --workers)",
                "teacher": "the teacher is the bound, as it should be",
                "rows": "checking and buffering rows is the bound",
                "writer": "storage writes are the bound (a faster disk or store location helps)",
            }[worst]
        )


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides a view's pixels and logits."""
    out = {"kdcache": __version__}
    for name in ("torch", "torchvision", "zarr", "numpy", "numcodecs"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def write_chunk(
    store: CacheStore,
    v: int,
    c: int,
    teacher: list[dict[str, np.ndarray]],
    params: list[np.ndarray],
    hashes: list[np.ndarray],
) -> None:
    """Write chunk ``c`` of view ``v`` (per kind: teacher arrays by base name, parameters, pixel hashes) and fsync it;
    not yet marked done."""
    names = array_names(len(teacher), store.format)
    rows = slice(c * CHUNK, c * CHUNK + len(hashes[0]))
    written = []
    for k in range(len(teacher)):
        for name in names["teacher"][k]:
            store.array(name)[v, rows] = teacher[k][name.removesuffix("_strong")]
            written.append(name)
        if store.has(names["params"][k]):
            store.array(names["params"][k])[v, rows] = params[k]
            written.append(names["params"][k])
        store.array(names["view_hash"][k])[v, rows] = hashes[k]
        written.append(names["view_hash"][k])
    store.sync_chunk(written, v, c)


def mark_done(store: CacheStore, v: int, c: int) -> None:
    """Record chunk ``c`` of view ``v`` as complete, after its data is durable."""
    store.array("done")[v, c] = 1
    store.sync_chunk(["done"], v, None)


def disk_error(v: int, c: int, exc: OSError) -> KdcacheError:
    """The one-line error for a failed chunk write; the store stays resumable."""
    return KdcacheError(
        f"writing view {v}, chunk {c} failed ({exc.strerror or exc}): free space or fix the "
        "store location, then re-run the same command to resume"
    )


def _write(store: CacheStore, job: tuple) -> None:
    """Write one whole chunk and then mark it done; a failed write (full disk, vanished mount) leaves it resumable."""
    v, c, logits, params, hashes = job
    try:
        write_chunk(store, v, c, logits, params, hashes)
        mark_done(store, v, c)
    except OSError as exc:
        raise disk_error(v, c, exc) from None


class _ThreadWriter:
    """Writes chunks on a background thread: for stores another process cannot open (``memory://``) and non-Linux
    hosts."""

    def __init__(self, store: CacheStore, max_pending: int = 4):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                _write(self.store, job)
                self.written += 1
            except BaseException as exc:  # surfaced to the producer on its next put/close
                self.error = exc

    def put(self, job: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _writer_process(location: str, parent: int, jobs, results) -> None:
    """Body of the writer process: write each job's chunk; report the first error at once and the count at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the dump, which then closes its writer in order
    libc = ctypes.CDLL(None)
    libc.prctl(_PR_SET_NAME, b"kdcache-writer")
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a SIGKILLed dump leaves no orphan writing into its store
    if os.getppid() != parent:
        return
    store = open_store(location, "r+")
    written, failed = 0, False
    while (job := jobs.get()) is not None:
        if failed:
            continue
        try:
            _write(store, job)
            written += 1
        except BaseException as exc:
            failed = True
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"chunk writer failed: {exc!r}")
            results.put(("error", exc))
    results.put(("written", written))


class _ProcessWriter:
    """Writes chunks in a forked child process, so a chunk write never takes the dump loop's GIL.

    Zarr encodes and stores a chunk through its own event-loop and pool
    threads: about 10 ms of GIL per CIFAR-100 chunk, which the loop thread
    (and, on a GPU, every CUDA call it makes) would otherwise wait behind.
    """

    def __init__(self, store: CacheStore, max_pending: int = 4):
        ctx = mp.get_context("fork")
        self.jobs, self.results = ctx.Queue(max_pending), ctx.Queue()
        self.error: BaseException | None = None
        self.written, self.finished = 0, False
        self.process = ctx.Process(
            target=_writer_process,
            args=(store.location, os.getpid(), self.jobs, self.results),
            name="kdcache-writer",
            daemon=True,
        )
        self.process.start()

    def _receive(self, timeout: float | None) -> bool:
        """Take one report from the writer, waiting up to ``timeout`` seconds (None: not at all); False when none
        came."""
        try:
            kind, value = self.results.get(timeout=timeout) if timeout else self.results.get_nowait()
        except queue.Empty:
            return False
        if kind == "error":
            self.error = value
        else:
            self.written, self.finished = value, True
        return True

    def _check_alive(self) -> None:
        if not self.process.is_alive() and not self._receive(0.5):
            self.jobs.cancel_join_thread()  # nobody will read what is still queued
            raise KdcacheError(
                f"the chunk writer process died (exit code {self.process.exitcode}): re-run the same command to resume"
            )

    def _send(self, job: tuple | None) -> None:
        while True:
            try:
                self.jobs.put(job, timeout=1.0)
                return
            except queue.Full:
                self._check_alive()

    def put(self, job: tuple) -> None:
        self._receive(None)
        if self.error is not None:
            raise self.error
        self._send(job)

    def close(self) -> None:
        self._send(None)
        while not self.finished:
            if not self._receive(1.0):
                self._check_alive()
        self.process.join()
        if self.error is not None:
            raise self.error


def _chunk_writer(store: CacheStore) -> _ThreadWriter | _ProcessWriter:
    """A process writer for local stores on Linux (fork, and the kernel ends it with the dump); a thread otherwise."""
    if sys.platform == "linux" and local_path(store.location) is not None:
        return _ProcessWriter(store)
    return _ThreadWriter(store)


def _prefetched(iterable, depth: int):
    """Iterate ``iterable`` on a background thread, ``depth`` items ahead, so in-process view building overlaps
    inference."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def run() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=run, name="kdcache-views", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def view_batches(view_set: ViewSet, batch_size: int, workers: int, pin: bool) -> Iterable[tuple]:
    """The batches of ``view_set`` in order, built by ``workers`` DataLoader processes or, with 0, one prefetch thread.

    ``pin`` puts each batch's pixels in page-locked memory (for a GPU teacher) on the loader's pinning thread.
    """
    loader = DataLoader(
        view_set,
        batch_size=None,
        sampler=BatchSampler(SequentialSampler(view_set), batch_size, drop_last=False),
        collate_fn=as_is,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin,
    )
    return _prefetched(loader, depth=2) if workers == 0 else loader


def join_pixels(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """Loader batches' pixels (kinds, n, C, H, W) joined along the view axis, in page-locked memory when ``pin``.

    A forward block that spans loader batches needs them in one tensor. Its
    copy to a GPU is asynchronous only from page-locked memory (from ordinary
    memory it first waits for the GPU's queued work), and numpy does the
    join: ``torch.cat`` runs on torch's CPU thread pool, which stalls for
    milliseconds beside busy loader workers (``bench/pool_stall.py``).
    """
    shape = (parts[0].shape[0], sum(x.shape[1] for x in parts), *parts[0].shape[2:])
    out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin)
    np.concatenate([x.numpy() for x in parts], axis=1, out=out.numpy())
    return out


def _teacher_top1(store: CacheStore) -> list[float]:
    labels = store.labels()
    return [store.top1(v, labels) for v in range(store.num_views)]


def dump_logits(
    *,
    teacher: str,
    dataset: str,
    augment: str,
    views: str | int,
    out: str,
    checkpoint: str | None = None,
    weights: str | None = None,
    data_root: str | None = None,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "auto",
    amp: str = "none",
    dtype: str = "float16",
    forward_block: int = 64,
    download: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    data: ImageDataset | None = None,
    scheduler: str | None = None,
    local_cluster: int | None = None,
    format: str = "full",
    mix: str = "none",
    mix_alpha: float = 1.0,
) -> DumpSummary:
    """Write (or resume, or extend) the teacher-logit cache ``out``; see the module docstring.

    Everything is validated (dataset, teacher, checkpoint, store identity)
    before the first byte is written; a mismatch with an existing store is
    refused naming the field unless ``overwrite``. ``format`` is ``full`` or
    ``topk:K`` (:mod:`kdcache.topk`); ``mix`` (``mixup``/``cutmix``, λ ~
    Beta(``mix_alpha``, ``mix_alpha``)) mixes each view with a partner sample's
    view, all drawn from the counter-based generator. ``scheduler`` (a dask
    address) or ``local_cluster`` (N worker processes) runs the chunks on
    dask.distributed (:mod:`kdcache.cluster`) with the same result.
    """
    distributed = scheduler is not None or local_cluster is not None
    if scheduler is not None and local_cluster is not None:
        raise KdcacheError("pass either --scheduler or --local-cluster, not both")
    if distributed and data is not None:
        raise KdcacheError("a distributed dump needs a --dataset name the workers can load, not an in-memory dataset")
    if local_cluster is not None and local_cluster < 1:
        raise KdcacheError(f"--local-cluster must be at least 1 worker, got {local_cluster}")
    if batch_size < 1:
        raise KdcacheError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise KdcacheError(f"--workers must be 0 or more, got {workers}")
    if dtype not in DTYPES:
        raise KdcacheError(f"unknown --dtype {dtype!r}: choose float16 or float32")
    if seed < 0:
        raise KdcacheError(f"--seed must be 0 or more, got {seed}")
    ds = data if data is not None else build_dataset(dataset, data_root, split, download)
    recipe = make_recipe(augment, ds.small, mix, mix_alpha)
    num_views, views_mode = parse_views(views, recipe)
    fmt = parse_format(format, ds.num_classes)
    check_writable_location(out)
    # A distributed dump's client only needs the teacher's identity; the workers run it on their own devices.
    model = load_teacher(
        teacher, ds.num_classes, ds.norm, checkpoint, weights, "cpu" if distributed else device, forward_block, amp
    )
    identity = {
        "teacher": model.identity(),
        "dataset": ds.fingerprint(),
        "split": ds.split,
        "recipe": recipe.to_attrs(),
        "seed": seed,
        "dtype": dtype,
        "num_classes": ds.num_classes,
        "views_mode": views_mode,
        "format": fmt.to_attrs(),
    }
    session = contextlib.nullcontext()
    if distributed:
        from kdcache.cluster import ChunkJob, cluster_client

        session = cluster_client(scheduler, local_cluster)
    with session as client, writer_lock(out):
        store, created = _prepare_store(out, overwrite, identity, num_views, str(views), ds, recipe, dtype, fmt)
        try:
            if client is not None:
                job = ChunkJob(
                    store.location,
                    teacher,
                    checkpoint,
                    model.checkpoint_sha256,
                    weights,
                    dataset,
                    data_root,
                    split,
                    augment,
                    seed,
                    views_mode == "all",
                    forward_block,
                    amp,
                    dtype,
                    device,
                    batch_size,
                )
                return _run_cluster(store, job, client, progress)
            return _run_dump(store, ds, recipe, model, seed, views_mode == "all", batch_size, workers, dtype, progress)
        except BaseException:
            if created and not store.done().any():
                remove_store(out)
            raise


def _prepare_store(
    out: str,
    overwrite: bool,
    identity: dict,
    num_views: int,
    views_requested: str,
    ds: ImageDataset,
    recipe: Recipe,
    dtype: str,
    fmt: LogitFormat,
) -> tuple[CacheStore, bool]:
    """Open the store for resuming or extending (refusing any identity mismatch), or create it; returns (store,
    created)."""
    exists = store_exists(out)
    if exists and overwrite:
        remove_store(out)
        exists = False
    if exists:
        store = open_store(out, "r+")
        diff = identity_mismatch(store.attrs, identity)
        if diff:
            raise KdcacheError(
                f"{out} was made differently: {diff}; use the same settings to resume, or --overwrite / a new --out"
            )
        if num_views > store.num_views:
            extend_views(store, num_views)
        return store, False
    attrs = {**identity, "versions": library_versions(), "views_requested": views_requested}
    store = create_store(
        out,
        num_views=num_views,
        labels=ds.labels,
        num_classes=ds.num_classes,
        dtype=dtype,
        kinds=len(recipe.kinds),
        param_fields=[list(recipe.fields(k)) for k in range(len(recipe.kinds))],
        attrs=attrs,
        fmt=fmt,
    )
    return store, True


def _run_dump(
    store: CacheStore,
    ds: ImageDataset,
    recipe: Recipe,
    teacher: Teacher,
    seed: int,
    all_views: bool,
    batch_size: int,
    workers: int,
    dtype: str,
    progress: bool,
) -> DumpSummary:
    n, chunks = store.num_samples, num_chunks(store.num_samples)
    todo = _todo(store)
    items = (
        np.concatenate(
            [np.stack(np.broadcast_arrays(v, np.arange(c * CHUNK, min(n, (c + 1) * CHUNK))), 1) for v, c in todo]
        )
        if todo
        else np.zeros((0, 2), dtype=np.int64)
    )
    kinds = len(recipe.kinds)
    pin = teacher.device.type == "cuda"
    loader = view_batches(ViewSet(ds, recipe, seed, items, all_views), batch_size, workers, pin)
    writer = _chunk_writer(store)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
    buf: dict[tuple[int, int], list] = {}
    pending: list[tuple] = []
    in_flight: deque[tuple] = deque()
    # Seconds of the loop's thread per stage: waiting for views, in the teacher (the forward pass on a CPU, issuing
    # it on a GPU), waiting for a GPU's logits, checking/encoding/buffering rows, waiting for room in the writer's
    # queue.
    stages = dict.fromkeys(("views", "teacher", "gpu_wait", "rows", "writer"), 0.0)
    clock = time.perf_counter

    def launch(final: bool) -> None:
        # Run the teacher on whole forward blocks only (the remainder waits for
        # the next loader batch), so --batch-size never changes the computation.
        count = sum(len(p[0]) for p in pending)
        take = count if final else count - count % teacher.forward_block
        if take == 0:
            return
        # One loader batch is used as it is: its pinned pixels go to the GPU without a copy.
        v_b, i_b, pix, par, hsh = (
            pending[0]
            if len(pending) == 1
            else (
                np.concatenate([p[0] for p in pending]),
                np.concatenate([p[1] for p in pending]),
                join_pixels([p[2] for p in pending], pin),
                *([np.concatenate([p[j][k] for p in pending]) for k in range(kinds)] for j in (3, 4)),
            )
        )
        pending.clear()
        if take < count:
            pending.append((v_b[take:], i_b[take:], pix[:, take:], [x[take:] for x in par], [x[take:] for x in hsh]))
        t = clock()
        launched = [teacher.launch(pix[k, :take]) for k in range(kinds)]
        stages["teacher"] += clock() - t
        in_flight.append((v_b[:take], i_b[:take], launched, [x[:take] for x in par], [x[:take] for x in hsh]))

    def store_rows(depth: int) -> None:
        # Keep ``depth`` batches on the GPU while the oldest one's rows are checked, encoded and buffered.
        while len(in_flight) > depth:
            t = clock()
            views_np, samples_np, launched, par, hsh = in_flight.popleft()
            outs = [h.result() for h in launched]
            waited = clock() - t
            stages["gpu_wait"] += waited
            for k, logits in enumerate(outs):
                check_logits(logits, views_np, samples_np, dtype, "strong " if k else "")
            chunk_np = samples_np // CHUNK
            rows_np = [encode(o, labels[torch.from_numpy(samples_np)], store.format, np_dtype) for o in outs]
            keys = views_np * chunks + chunk_np
            for key in np.unique(keys).tolist():
                v, c = divmod(key, chunks)
                sel = np.flatnonzero(keys == key)
                if (v, c) not in buf:
                    size = min(n, (c + 1) * CHUNK) - c * CHUNK
                    buf[v, c] = [
                        0,
                        [
                            {name: np.empty((size, *a.shape[1:]), a.dtype) for name, a in rows_np[k].items()}
                            for k in range(kinds)
                        ],
                        [np.empty((size, par[k].shape[1]), np.float32) for k in range(kinds)],
                        [np.empty(size, np.uint64) for _ in range(kinds)],
                    ]
                entry = buf[v, c]
                r = samples_np[sel] - c * CHUNK
                for k in range(kinds):
                    for name, a in rows_np[k].items():
                        entry[1][k][name][r] = a[sel]
                    entry[2][k][r] = par[k][sel]
                    entry[3][k][r] = hsh[k][sel]
                entry[0] += len(sel)
                if entry[0] == len(entry[3][0]):
                    w = clock()
                    writer.put((v, c, entry[1], entry[2], entry[3]))
                    w = clock() - w
                    stages["writer"] += w
                    waited += w
                    del buf[v, c]
            bar.update(len(samples_np))
            stages["rows"] += clock() - t - waited

    start = time.perf_counter()
    bar = tqdm(
        total=len(items), unit="view", disable=None if progress else True, desc="dump-logits", dynamic_ncols=True
    )
    try:
        batches = iter(loader)
        while True:
            t = clock()
            batch = next(batches, None)
            stages["views"] += clock() - t
            if batch is None:
                break
            pending.append(batch)
            launch(final=False)
            store_rows(depth=2)
        launch(final=True)
        store_rows(depth=0)
    finally:
        bar.close()
        writer.close()
    return _finish(store, writer.written, time.perf_counter() - start, len(items), bool(todo), stages if todo else {})


def _todo(store: CacheStore) -> list[tuple[int, int]]:
    """The (view, chunk) pairs not yet marked done, in view-major order."""
    done = store.done()
    return [(v, c) for v in range(store.num_views) for c in range(num_chunks(store.num_samples)) if not done[v, c]]


def _run_cluster(store: CacheStore, job, client, progress: bool) -> DumpSummary:
    from kdcache.cluster import run_on_cluster

    todo = _todo(store)
    n = store.num_samples
    written, seconds = run_on_cluster(client, store, job, todo, progress)
    return _finish(store, written, seconds, sum(min(n, (c + 1) * CHUNK) - c * CHUNK for _, c in todo), bool(todo))


def _finish(
    store: CacheStore, written: int, seconds: float, items: int, had_work: bool, stages: dict[str, float] | None = None
) -> DumpSummary:
    """Record per-view teacher accuracy once the store is complete and summarise the run."""
    store.refresh()
    top1 = _teacher_top1(store) if store.complete() else []
    if top1:
        store.group.attrs["teacher_top1"] = top1
        store.group.attrs["complete"] = True
    notes = [] if had_work else ["nothing to do: every chunk of every view was already written"]
    return DumpSummary(
        store.location,
        store.num_views,
        store.num_samples,
        store.num_classes,
        written,
        top1,
        disk_bytes(store.location),
        seconds,
        items / max(seconds, 1e-9),
        notes,
        stages or {},
    )


def check_logits(logits: torch.Tensor, views: np.ndarray, samples: np.ndarray, dtype: str, kind: str) -> None:
    """Refuse non-finite logits, and logits a float16 store cannot hold, naming the first bad (sample, view)."""
    a = logits.numpy()  # numpy: torch's CPU thread pool stalls behind busy loader workers
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise KdcacheError(
            f"teacher produced non-finite {kind}logits for sample {int(samples[r])}, view {int(views[r])}: check "
            "the checkpoint and --amp"
        )
    if dtype == "float16":
        over = np.abs(a).max(axis=1) > FLOAT16_MAX
        if over.any():
            r = int(np.flatnonzero(over)[0])
            raise KdcacheError(
                f"teacher {kind}logits of sample {int(samples[r])}, view {int(views[r])} exceed the float16 range "
                "(|x| > 65504): use --dtype float32"
            )
