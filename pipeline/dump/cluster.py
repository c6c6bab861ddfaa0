"""Stage one on a dask.distributed cluster: one task per work unit, workers write straight to the shared store.

The coordinating client (inside :func:`kdcache.dump.loop.dump_logits`) creates the
arrays, writes the attributes and holds the writer lock; each task computes
one :class:`~kdcache.dump.chunks.Unit` (several views of one chunk's samples) with
a teacher the worker loaded once, writes and fsyncs its rows, and returns.
Only the client marks the unit's chunks done, after its task returned, so a
worker killed mid-task leaves nothing marked and dask re-runs the task
elsewhere. A view's values depend only on (seed, view, sample) and the
teacher's fixed forward blocks, so the store is bit-identical to a
single-process dump of the same command.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from kdcache.dataset.datasets import ImageDataset, build_dataset
from kdcache.dump.chunks import ChunkRows, Unit, ViewSet, chunk_rows, mark_done, teacher_rows
from kdcache.errors import KdcacheError
from kdcache.progress import Progress
from kdcache.store.cache import CacheStore, open_store
from kdcache.teacher.runner import Teacher, load_teacher
from kdcache.views.recipes import recipe_from_attrs


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs to rebuild the dump's teacher, data and views: small and picklable."""

    location: str
    teacher: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    weights: str | None
    dataset: str
    data_root: str | None
    split: str
    seed: int
    all_views: bool
    forward_block: int
    amp: str
    dtype: str
    device: str
    batch_size: int


@dataclass
class _WorkerState:
    teacher: Teacher
    dataset: ImageDataset


_STATE: dict[ChunkJob, _WorkerState] = {}
_STATE_LOCK = threading.Lock()


def _worker_device(requested: str) -> str:
    """``auto`` on a GPU worker pins it to one device by its worker number, so N local workers use N GPUs."""
    if requested != "auto" or not torch.cuda.is_available():
        return requested
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _state(job: ChunkJob) -> _WorkerState:
    """The worker's teacher and dataset for ``job``, loaded on its first task and reused after.

    The store is not kept: a scheduler outlives dumps, and the same command may
    meet an extended or overwritten store (other shapes, another recipe version)
    next time, so each task opens it and rebuilds the recipe it records.
    """
    with _STATE_LOCK:
        if job not in _STATE:
            ds = build_dataset(job.dataset, job.data_root, job.split)
            teacher = load_teacher(
                job.teacher,
                ds.num_classes,
                ds.norm,
                job.checkpoint,
                job.weights,
                _worker_device(job.device),
                job.forward_block,
                job.amp,
            )
            if teacher.checkpoint_sha256 != job.checkpoint_sha256:
                raise KdcacheError(
                    f"worker on {os.uname().nodename} sees a different {job.checkpoint} than the client "
                    "(sha256 differs): put the checkpoint on storage every worker shares"
                )
            _STATE[job] = _WorkerState(teacher, ds)
        return _STATE[job]


def dump_unit(job: ChunkJob, unit: Unit) -> tuple[Unit, int]:
    """Compute and write every chunk of ``unit`` on a worker (not marked done); returns (unit, views computed)."""
    st = _state(job)
    store = open_store(job.location, "r+")
    recipe = recipe_from_attrs(store.attr_dict("recipe"))
    items = unit.items(store.num_samples)
    view_set = ViewSet(st.dataset, recipe, job.seed, items, job.all_views)
    labels = torch.from_numpy(np.asarray(st.dataset.labels, dtype=np.int64))
    size = len(chunk_rows(store.num_samples, unit.chunk))
    chunks: dict[int, ChunkRows] = {}
    # Blocks start at the unit's first item here and wherever the loader's batches put them in a single-process dump:
    # a view's logits depend on the fixed block size, not on the other views in its block, so both give the same rows.
    step = max(job.batch_size - job.batch_size % job.forward_block, job.forward_block)
    for s in range(0, len(items), step):
        batch = view_set[list(range(s, min(len(items), s + step)))]
        outs = [st.teacher(x) for x in batch.pixels]
        teacher = teacher_rows(outs, batch.views, batch.samples, labels, store.format, job.dtype)
        for v in np.unique(batch.views).tolist():
            sel = np.flatnonzero(batch.views == v)
            if v not in chunks:
                chunks[v] = ChunkRows.empty(v, unit.chunk, size, teacher, batch.params)
            chunks[v].add(batch, teacher, sel)
    for chunk in chunks.values():
        chunk.write(store)  # the client marks the unit done once the task has returned
    return unit, len(items)


_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss|inproc)://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}")


def check_scheduler(address: str | None) -> None:
    """Refuse a ``--scheduler`` that is not an address (``tcp://HOST:PORT``) before anything connects."""
    if address is not None and not _ADDRESS.fullmatch(str(address)):
        raise KdcacheError(
            f"--scheduler {address!r} is not a dask scheduler address: give tcp://HOST:PORT (as `dask scheduler` "
            "prints it)"
        )


@contextlib.contextmanager
def cluster_client(scheduler: str | None, local_cluster: int | None) -> Iterator:
    """A dask ``Client`` for ``--scheduler ADDRESS`` or a new ``LocalCluster`` of ``--local-cluster N`` processes.

    On exit the client disconnects, and a cluster this run started is shut
    down. Its nannies set variables in this process's environment for the
    workers they spawn (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ...) and
    leave them there; they are put back, so a Python caller's later
    subprocesses do not run single-threaded.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise KdcacheError(
            "--scheduler / --local-cluster need dask.distributed: pip install 'dask[distributed]'"
        ) from None
    if local_cluster is None:
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout="5s")
        except OSError as exc:
            raise KdcacheError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}): start it with `dask scheduler` "
                "or pass --local-cluster N"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    environ = dict(os.environ)
    try:
        with (
            LocalCluster(
                n_workers=local_cluster, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:
        os.environ.clear()
        os.environ.update(environ)


def run_on_cluster(client, store: CacheStore, job: ChunkJob, todo: list[Unit], progress: bool) -> tuple[int, float]:
    """Submit one task per unit in ``todo``, mark its chunks done as it returns; returns (chunks written, seconds)."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    if progress and client.dashboard_link:
        tqdm.write(f"dask dashboard: {client.dashboard_link}")
    total = sum(u.size(store.num_samples) for u in todo)
    start = time.perf_counter()
    futures = [
        client.submit(dump_unit, job, u, key=f"kdcache-unit-{u.chunk}-{u.views[0]}-{os.getpid()}", pure=False)
        for u in todo
    ]
    written = 0
    bar = Progress(total, "dump-logits (cluster)", "view", progress)
    try:
        for fut in as_completed(futures):
            try:
                unit, rows = fut.result()
            except KilledWorker as exc:
                raise KdcacheError(
                    f"dask workers kept dying on {exc.task}: check worker memory and logs, then re-run the "
                    "same command to resume"
                ) from None
            for v in unit.views:
                mark_done(store, v, unit.chunk)
            written += len(unit.views)
            bar.update(rows)
    finally:
        bar.close()
        client.cancel(futures)
    return written, time.perf_counter() - start
