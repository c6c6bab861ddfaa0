"""Stage one: run a teacher over replayable views and write its logits into a Zarr cache.

A chunk is one view index x :data:`~kdcache.store.cache.CHUNK` samples, the unit of
storage and resumption; the unit of work (:class:`~kdcache.dump.chunks.Unit`) is
several views of one chunk's samples, built sample-major so each image is
decoded once for all of them. DataLoader workers build the views (uint8,
CPU); the teacher runs in fixed padded blocks; rows are gathered into whole
chunks, and each finished unit is handed to a background writer
(:mod:`kdcache.dump.writer`), which writes logits, parameters and pixel hashes and
only then marks its chunks done, so the teacher never waits on storage. A
re-run skips done chunks, so an interrupted dump resumes and ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from kdcache import __version__
from kdcache.dataset.datasets import ImageDataset, build_dataset, check_dataset, worker_errors
from kdcache.dump.chunks import ChunkRows, Unit, ViewBatch, ViewSet, as_is, chunk_rows, plan_units, teacher_rows
from kdcache.dump.cluster import ChunkJob, check_scheduler, cluster_client, run_on_cluster
from kdcache.dump.writer import chunk_writer
from kdcache.errors import KdcacheError
from kdcache.progress import Progress
from kdcache.settings import DUMP_DEFAULTS as D
from kdcache.settings import check_options, old_names, resolve
from kdcache.settings.table import DUMP
from kdcache.store.cache import (
    CHUNK,
    CacheStore,
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
from kdcache.store.checks import open_checked
from kdcache.store.formats import LogitFormat, parse_format
from kdcache.store.inspection import view_predictions
from kdcache.store.manifest import write_manifest
from kdcache.teacher.runner import Teacher, load_teacher
from kdcache.views.recipes import Recipe, make_recipe, parse_views, resumed_recipe


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
    #: whether the teacher ran on a GPU (the ``gpu_wait`` stage is shown only then)
    on_gpu: bool = False

    def lines(self) -> list[str]:
        top = np.asarray(self.teacher_top1) * 100
        out = [
            f"cache     {self.location}",
            f"views     {self.num_views}  samples {self.num_samples}  classes {self.num_classes}",
        ]
        if self.written_chunks:
            rate = f"{self.samples_per_second:,.0f} views/s"
            out.append(f"written   {self.written_chunks} chunks in {self.seconds:.1f} s ({rate})")
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
        spent = "  ".join(f"{k} {v:.2f} s" for k, v in s.items() if k != "gpu_wait" or self.on_gpu)
        parts = {"views": s["views"], "teacher": s["teacher"] + s["gpu_wait"], "rows": s["rows"], "writer": s["writer"]}
        worst = max(parts, key=lambda k: parts[k])
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


def _prefetched(iterable, depth: int):
    """Iterate ``iterable`` on a background thread, ``depth`` items ahead, so in-process view building overlaps
    inference."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer stopped first; False when it did."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # re-raised in the consumer
            put(exc)

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


def view_batches(view_set: ViewSet, batch_size: int, workers: int, pin: bool) -> Iterable[ViewBatch]:
    """The batches of ``view_set`` in order, built by ``workers`` DataLoader processes or, with 0, one prefetch thread.

    ``pin`` puts each batch's pixels in page-locked memory (for a GPU teacher) on the loader's pinning thread.
    """
    loader = DataLoader(
        view_set,
        batch_size=None,
        sampler=BatchSampler(SequentialSampler(view_set), batch_size, drop_last=False),
        # torch types collate_fn for a list of samples; with batch_size=None it is given each batch the sampler made
        collate_fn=as_is,  # type: ignore[arg-type]
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin,
    )
    return _prefetched(loader, depth=2) if workers == 0 else worker_errors(loader)


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
    return [float((view_predictions(store, v)[0] == labels).mean()) for v in range(store.num_views)]


def dump_settings(config: str | Path | None = None, **given: object) -> dict[str, object]:
    """The settings of a dump: a kdcache-form ``config`` file's with ``given`` on top, as ``dump-logits --config``
    resolves them; pass the result to :func:`dump_logits`."""
    return resolve(DUMP, config, given)


@old_names(seed="view_seed")
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
    split: str = D.split,
    view_seed: int = D.view_seed,
    batch_size: int = D.batch_size,
    workers: int = D.workers,
    device: str = D.device,
    amp: str = D.amp,
    dtype: str = D.dtype,
    forward_block: int = D.forward_block,
    download: bool = D.download,
    overwrite: bool = D.overwrite,
    progress: bool = True,
    data: ImageDataset | None = None,
    scheduler: str | None = None,
    local_cluster: int | None = None,
    format: str = D.format,
    mix: str = D.mix,
    mix_alpha: float = D.mix_alpha,
) -> DumpSummary:
    """Write (or resume, or extend) the teacher-logit cache ``out``; see the module docstring.

    Everything is validated (dataset, teacher, checkpoint, store identity)
    before the first byte is written; a mismatch with an existing store is
    refused naming the field unless ``overwrite``. ``format`` is ``full`` or
    ``topk:K`` (:mod:`kdcache.store.formats`); ``mix`` (``mixup``/``cutmix``, λ ~
    Beta(``mix_alpha``, ``mix_alpha``)) mixes each view with a partner sample's
    view, all drawn from the counter-based generator. ``scheduler`` (a dask
    address) or ``local_cluster`` (N worker processes) runs the chunks on
    dask.distributed (:mod:`kdcache.dump.cluster`) with the same result.
    """
    args = dict(locals())
    distributed = scheduler is not None or local_cluster is not None
    check_options({k: v for k, v in args.items() if k != "data"})
    _check_options(scheduler, local_cluster, data is not None)
    ds = data if data is not None else _inputs(dataset, data_root, split, download, checkpoint)
    check_dataset(ds)
    existing = None if overwrite or not store_exists(out) else open_checked(out)
    recipe = make_recipe(augment, ds.small, mix, mix_alpha)
    if existing is not None:  # a store made with older strong-view semantics keeps them
        recipe = resumed_recipe(recipe, existing.attr_dict("recipe"))
    num_views, views_mode = parse_views(views, recipe)
    fmt = parse_format(format, ds.num_classes)
    check_writable_location(out)
    # A distributed dump's client only needs the teacher's identity; the workers run it on their own devices.
    model = load_teacher(
        teacher, ds.num_classes, ds.norm, checkpoint, weights, "cpu" if distributed else device, forward_block, amp
    )
    ds.check_images(_samples_to_decode(existing, num_views, len(ds), recipe))
    identity = _identity(model, ds, recipe, view_seed, dtype, views_mode, fmt)
    session = cluster_client(scheduler, local_cluster) if distributed else contextlib.nullcontext()
    with session as client, writer_lock(out):
        store, created = _prepare_store(out, overwrite, identity, num_views, str(views), ds, recipe, dtype, fmt)
        try:
            if client is not None:
                return _run_cluster(store, _chunk_job(store, model, views_mode, args), client, progress)
            every = views_mode == "all"
            return _run_dump(store, ds, recipe, model, view_seed, every, batch_size, workers, dtype, progress)
        except BaseException:
            if created and not store.done().any():
                remove_store(out)
            raise


def _inputs(dataset: str, data_root: str | None, split: str, download: bool, checkpoint: str | None) -> ImageDataset:
    """The dataset, with a missing checkpoint file reported in the same line as a missing dataset (all at once)."""
    lp = local_path(checkpoint) if checkpoint else None
    gone = f"checkpoint {checkpoint} not found: check the path" if lp is not None and not lp.exists() else None
    try:
        ds = build_dataset(dataset, data_root, split, download)
    except KdcacheError as exc:
        raise KdcacheError(f"{exc}; also, {gone}" if gone else str(exc)) from None
    if gone:
        raise KdcacheError(gone)
    return ds


def _chunk_job(store: CacheStore, model: Teacher, views_mode: str, args: dict) -> ChunkJob:
    """What a dask worker needs to run this dump's units (``args``: dump_logits's arguments)."""
    fields = ("teacher", "checkpoint", "weights", "dataset", "data_root", "split", "forward_block", "amp")
    return ChunkJob(
        location=store.location,
        seed=args["view_seed"],
        checkpoint_sha256=model.checkpoint_sha256,
        all_views=views_mode == "all",
        **{k: args[k] for k in (*fields, "dtype", "device", "batch_size")},
    )


def _identity(
    model: Teacher, ds: ImageDataset, recipe: Recipe, seed: int, dtype: str, views_mode: str, fmt: LogitFormat
) -> dict[str, object]:
    """What a store is: the fields a resume or extension must find unchanged (``IDENTITY_FIELDS``)."""
    return {
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


def _check_options(scheduler: str | None, local_cluster: int | None, in_memory: bool) -> None:
    """Refuse option combinations no dump can run with, before anything is loaded (numbers: :mod:`kdcache.settings`)."""
    distributed = scheduler is not None or local_cluster is not None
    if scheduler is not None and local_cluster is not None:
        raise KdcacheError("pass either --scheduler or --local-cluster, not both")
    check_scheduler(scheduler)
    if distributed and in_memory:
        raise KdcacheError("a distributed dump needs a --dataset name the workers can load, not an in-memory dataset")


def _samples_to_decode(existing: CacheStore | None, num_views: int, num_samples: int, recipe: Recipe) -> np.ndarray:
    """The samples whose images this dump will decode: those of chunks some view of ``existing`` lacks, or all.

    A resumed dump skips its finished chunks, so it need not re-check their
    images; new views, or a mixing recipe's partners, may decode any sample.
    """
    everything = np.arange(num_samples)
    if existing is None or recipe.mix != "none" or existing.num_views < num_views:
        return everything
    return everything[np.isin(everything // CHUNK, np.flatnonzero(~existing.done().all(axis=0)))]


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


STAGES = ("views", "teacher", "gpu_wait", "rows", "writer")


class DumpLoop:
    """The single-process dump loop: loader batches -> whole forward blocks -> rows gathered into chunks -> writer.

    The teacher runs on whole forward blocks only (a remainder waits for the
    next loader batch), so ``--batch-size`` never changes the computation, and
    keeps two blocks in flight on a GPU while the oldest one's rows are checked,
    encoded and gathered into their chunks. :attr:`stages` holds the seconds of
    the loop's thread per stage: waiting for views, in the teacher (the forward
    pass on a CPU, issuing it on a GPU), waiting for a GPU's logits, checking and
    gathering rows, and waiting for room in the writer's queue.
    """

    def __init__(
        self,
        store: CacheStore,
        units: list[Unit],
        teacher: Teacher,
        labels: np.ndarray,
        dtype: str,
        writer,
        bar: Progress,
    ):
        self.store, self.teacher, self.dtype, self.writer, self.bar = store, teacher, dtype, writer, bar
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.pin = teacher.device.type == "cuda"
        self.num_chunks = num_chunks(store.num_samples)
        #: loader batches not yet sent to the teacher (fewer views than a forward block, unless final)
        self.pending: list[ViewBatch] = []
        #: blocks sent to the teacher whose logits are not read back yet, each with its handles per view kind
        self.in_flight: deque[tuple[ViewBatch, list]] = deque()
        #: chunks with some of their rows gathered, by (view, chunk)
        self.chunks: dict[tuple[int, int], ChunkRows] = {}
        #: the unit each (view, chunk) belongs to, and each unit's chunks that are full and wait for the rest
        self.unit_of: dict[tuple[int, int], Unit] = {(v, u.chunk): u for u in units for v in u.views}
        self.finished: dict[Unit, list[ChunkRows]] = {}
        self.stages = dict.fromkeys(STAGES, 0.0)

    def run(self, batches: Iterable[ViewBatch]) -> None:
        it = iter(batches)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            self.stages["views"] += time.perf_counter() - t
            if batch is None:
                break
            self.pending.append(batch)
            self.launch(final=False)
            self.store_rows(depth=2)
        self.launch(final=True)
        self.store_rows(depth=0)

    def launch(self, final: bool) -> None:
        """Send the pending views' whole forward blocks (all of them when ``final``) to the teacher."""
        count = sum(len(b.views) for b in self.pending)
        take = count if final else count - count % self.teacher.forward_block
        if take == 0:
            return
        # One loader batch is used as it is: its pinned pixels go to the GPU without a copy.
        batch = self.pending[0] if len(self.pending) == 1 else self._join(self.pending)
        self.pending.clear()
        if take < count:
            self.pending.append(batch.rows(slice(take, None)))
            batch = batch.rows(slice(take))
        t = time.perf_counter()
        handles = [self.teacher.launch(x) for x in batch.pixels]
        self.stages["teacher"] += time.perf_counter() - t
        self.in_flight.append((batch, handles))

    def _join(self, parts: list[ViewBatch]) -> ViewBatch:
        kinds = range(len(parts[0].params))
        return ViewBatch(
            np.concatenate([p.views for p in parts]),
            np.concatenate([p.samples for p in parts]),
            join_pixels([p.pixels for p in parts], self.pin),
            [np.concatenate([p.params[k] for p in parts]) for k in kinds],
            [np.concatenate([p.hashes[k] for p in parts]) for k in kinds],
        )

    def store_rows(self, depth: int) -> None:
        """Read back launched blocks until ``depth`` remain in flight, gathering their rows into chunks."""
        while len(self.in_flight) > depth:
            t = time.perf_counter()
            batch, handles = self.in_flight.popleft()
            outs = [h.result() for h in handles]
            waited = time.perf_counter() - t
            self.stages["gpu_wait"] += waited
            teacher = teacher_rows(outs, batch.views, batch.samples, self.labels, self.store.format, self.dtype)
            waited += self._gather(batch, teacher)
            self.bar.update(len(batch.samples))
            self.stages["rows"] += time.perf_counter() - t - waited

    def _gather(self, batch: ViewBatch, teacher: list[dict[str, np.ndarray]]) -> float:
        """Put a block's rows into their chunks, handing full units to the writer; returns seconds waited on it."""
        keys = batch.views * self.num_chunks + batch.samples // CHUNK
        waited = 0.0
        for key in np.unique(keys).tolist():
            v, c = divmod(key, self.num_chunks)
            sel = np.flatnonzero(keys == key)
            if (v, c) not in self.chunks:
                size = len(chunk_rows(self.store.num_samples, c))
                self.chunks[v, c] = ChunkRows.empty(v, c, size, teacher, batch.params)
            chunk = self.chunks[v, c]
            chunk.add(batch, teacher, sel)
            if not chunk.full:
                continue
            unit = self.unit_of[v, c]
            done = self.finished.setdefault(unit, [])
            done.append(self.chunks.pop((v, c)))
            if len(done) == len(unit.views):
                t = time.perf_counter()
                self.writer.put(self.finished.pop(unit))
                waited += time.perf_counter() - t
        self.stages["writer"] += waited
        return waited


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
    todo = _todo(store)
    items = np.concatenate([np.zeros((0, 2), np.int64)] + [u.items(store.num_samples) for u in todo])
    loader = view_batches(
        ViewSet(ds, recipe, seed, items, all_views), batch_size, workers, teacher.device.type == "cuda"
    )
    writer = chunk_writer(store)
    start = time.perf_counter()
    bar = Progress(len(items), "dump-logits", "view", progress)
    loop = DumpLoop(store, todo, teacher, ds.labels, dtype, writer, bar)
    try:
        loop.run(loader)
    except BaseException:
        bar.close()
        with contextlib.suppress(Exception):  # the writer still finishes what it holds; the loop's error is reported
            writer.close()
        raise
    bar.close()
    writer.close()
    seconds = time.perf_counter() - start
    summary = _finish(store, writer.written, seconds, len(items), bool(todo), loop.stages if todo else {})
    return dataclasses.replace(summary, on_gpu=teacher.device.type == "cuda")


def _todo(store: CacheStore) -> list[Unit]:
    """The units covering every (view, chunk) not yet marked done."""
    return plan_units(store.done(), store.row_bytes())


def _run_cluster(store: CacheStore, job: ChunkJob, client, progress: bool) -> DumpSummary:
    todo = _todo(store)
    written, seconds = run_on_cluster(client, store, job, todo, progress)
    return _finish(store, written, seconds, sum(u.size(store.num_samples) for u in todo), bool(todo))


def _finish(
    store: CacheStore, written: int, seconds: float, items: int, had_work: bool, stages: dict[str, float] | None = None
) -> DumpSummary:
    """Record per-view teacher accuracy once the store is complete and summarise the run."""
    store.refresh()
    top1 = _teacher_top1(store) if store.complete() else []
    if top1:
        store.group.attrs["teacher_top1"] = top1
        store.group.attrs["complete"] = True
        write_manifest(store.location)  # every file with its size and sha256: the cache can be read where it lies
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
