"""Background chunk writers for the single-process dump, so the teacher never waits on storage.

Local stores on Linux are written by a forked child process (``kdcache-writer``),
which takes zarr's per-chunk GIL work out of the dump loop's process and is
killed with the dump; other stores (``memory://``, remote URLs on other hosts)
by a thread. Either writes a unit's chunks whole, then marks them done.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading

from kdcache.dump.chunks import ChunkRows, write_unit
from kdcache.errors import KdcacheError
from kdcache.store.cache import CacheStore, local_path, open_store

_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15  # prctl(2) options


class ThreadWriter:
    """Writes chunks on a background thread: for stores another process cannot open (``memory://``) and non-Linux
    hosts."""

    def __init__(self, store: CacheStore, max_pending: int = 2):
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
                write_unit(self.store, job)
                self.written += len(job)
            except BaseException as exc:  # surfaced to the producer on its next put/close
                self.error = exc

    def put(self, job: list[ChunkRows]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _writer_process(location: str, parent: int, jobs, results) -> None:
    """Body of the writer process: write each unit's chunks; report the first error at once and the count at the end."""
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
            write_unit(store, job)
            written += len(job)
        except BaseException as exc:
            failed = True
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"chunk writer failed: {exc!r}")
            results.put(("error", exc))
    results.put(("written", written))


class ProcessWriter:
    """Writes chunks in a forked child process, so a chunk write never takes the dump loop's GIL.

    Zarr encodes and stores a chunk through its own event-loop and pool
    threads: about 10 ms of GIL per CIFAR-100 chunk, which the loop thread
    (and, on a GPU, every CUDA call it makes) would otherwise wait behind.
    """

    def __init__(self, store: CacheStore, max_pending: int = 2):
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

    def _send(self, job: list[ChunkRows] | None) -> None:
        while True:
            try:
                self.jobs.put(job, timeout=1.0)
                return
            except queue.Full:
                self._check_alive()

    def put(self, job: list[ChunkRows]) -> None:
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


def chunk_writer(store: CacheStore) -> ThreadWriter | ProcessWriter:
    """A process writer for local stores on Linux (fork, and the kernel ends it with the dump); a thread otherwise."""
    if sys.platform == "linux" and local_path(store.location) is not None:
        return ProcessWriter(store)
    return ThreadWriter(store)
