"""Running a sweep's students: side by side on this machine, or as dask.distributed tasks, and dying with the sweep.

Local students fork from a server that imported torch once. Each gets the read end of a *lifeline*, a pipe whose
only write end the sweep holds and never writes: when the sweep's process dies (SIGKILL included) the kernel closes
it, the student's watcher thread reads end-of-file and the student kills itself at once. A student whose lifeline is
already at end-of-file when it starts (the sweep was killed while the fork server was still starting) exits before it
writes anything. A dask task runs ``python -m kdcache.experiments.student`` in a child of its worker that dies with
the worker (``PR_SET_PDEATHSIG``), and writes ``task.json`` so the sweep can say it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from kdcache.dump.cluster import cluster_client
from kdcache.errors import KdcacheError
from kdcache.experiments.monitor import TASK_FILE, SweepMonitor
from kdcache.experiments.student import train_plan
from kdcache.train.runfolder import finished_run

#: The exit code of a student that found its sweep gone before it started.
ORPHANED = 75


def _command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "kdcache.experiments.student", str(folder)]


def _die_with_parent(parent: int | None = None) -> None:
    """In a child: be killed when the process (thread) that started it dies; exit at once if it is gone already
    (``PR_SET_PDEATHSIG`` set after the parent died never fires)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(ORPHANED)


def run_student(folder: str | Path, env: dict[str, str] | None = None) -> int:
    """Run (or resume) one sweep run's ``train-student`` in a child process; its exit code. Output goes to train.log.
    ``task.json`` in the run folder says where and when it started (the sweep prints ``started`` on seeing it)."""
    folder = Path(folder)
    task = {"host": socket.gethostname(), "pid": os.getpid(), "resumed": (folder / "last.pt").exists()}
    (folder / TASK_FILE).write_text(json.dumps(task) + "\n")
    parent = os.getpid()
    with (folder / "train.log").open("a") as log:
        proc = subprocess.run(
            _command(folder),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONWARNINGS": "ignore"},
            preexec_fn=lambda: _die_with_parent(parent),
        )
    return proc.returncode


def last_line(folder: Path) -> str:
    try:
        lines = [x for x in (folder / "train.log").read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def slots(parallel: int, per_gpu: int, threads: int) -> list[dict[str, str]]:
    """The environment of each concurrent student: its GPU (round-robin) and its CPU threads.

    Every student gets ``threads`` threads however many run at once: CPU results depend on the thread count, so a
    SPEC gives the same numbers with any ``parallel``.
    """
    import torch

    if min(parallel, per_gpu, threads) < 1:
        raise KdcacheError(
            f"--parallel, --per-gpu and --threads must be at least 1, got {parallel}, {per_gpu} and {threads}"
        )
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    gpus = gpus or [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        return [env] * parallel
    if parallel > len(gpus) * per_gpu:
        raise KdcacheError(
            f"--parallel {parallel} students need {-(-parallel // per_gpu)} GPUs at --per-gpu {per_gpu}, but "
            f"{len(gpus)} are visible: raise --per-gpu or lower --parallel"
        )
    return [{**env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(parallel)]


def report_end(monitor: SweepMonitor, run: Any, folder: Path, code: int, failed: dict[str, str]) -> None:
    """``finished`` with the run's last-epoch top-1, or ``failed`` with the last line of its log."""
    monitor.ended(run)
    history = finished_run(folder, run.epochs)
    if code == 0 and history:
        top1 = history[-1]["test_top1"]
        monitor.line(run, "finished")
        monitor.say(f"{'':<9} last-epoch test top-1 {top1:.2f}%  ({sum(h['seconds'] for h in history):.1f} s)")
    else:
        failed[run.name] = last_line(folder)
        monitor.line(run, "failed")
        monitor.say(f"{'':<9} {failed[run.name]}  (log: {folder / 'train.log'})")


def _watch_lifeline(lifeline: multiprocessing.connection.Connection) -> None:
    """Exit now if the sweep is gone; else kill this process the moment it goes (its pipe reaches end-of-file)."""
    if lifeline.poll(0):  # never written to: readable means end-of-file, the sweep has died
        os._exit(ORPHANED)

    def watch() -> None:
        try:
            lifeline.poll(None)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kdcache-lifeline", daemon=True).start()


def _student_process(folder: str, env: dict[str, str], lifeline: multiprocessing.connection.Connection) -> None:
    """A forked student: its lifeline first, then its environment and threads, its log, then ``train-student`` on
    its plan (exit 2 on a refusal, as the command would)."""
    _watch_lifeline(lifeline)
    # The fork server hands every child a copy of the sweep's end of its own alive pipe: without this close, the
    # server would outlive the sweep for as long as a student runs.
    alive = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
    _die_with_parent()
    import torch

    os.environ.update({**env, "PYTHONWARNINGS": "ignore"})
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    log = os.open(Path(folder) / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for fd in (1, 2):
        os.dup2(log, fd)
    warnings.simplefilter("ignore")
    sys.exit(train_plan(folder))


def _fork_server() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """Students forked from a server that imported torch and kdcache once (saves seconds per run)."""
    if sys.platform.startswith("linux"):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "kdcache.train.trainer", "kdcache.experiments.launch"])
        return context
    return multiprocessing.get_context("spawn")


def run_local(todo: list[Any], out: Path, envs: list[dict[str, str]], monitor: SweepMonitor) -> dict[str, str]:
    """Run the students, ``len(envs)`` at a time, each in its own process, each on the sweep's lifeline."""
    context = _fork_server()
    failed: dict[str, str] = {}
    active: dict[multiprocessing.process.BaseProcess, tuple[Any, int]] = {}
    pending, free = list(todo), list(range(len(envs)))
    lifeline, keep = multiprocessing.Pipe(duplex=False)  # `keep` is never written: it closes when the sweep dies
    try:
        while pending or active:
            while pending and free:
                run, slot = pending.pop(0), free.pop(0)
                folder = out / run.folder
                monitor.started(run, (folder / "last.pt").exists())
                proc = context.Process(target=_student_process, args=(str(folder), envs[slot], lifeline), daemon=False)
                proc.start()
                active[proc] = (run, slot)
            time.sleep(0.1)
            monitor.poll()
            for ended, code in [(p, p.exitcode) for p in active if p.exitcode is not None]:
                run, slot = active.pop(ended)
                free.append(slot)
                report_end(monitor, run, out / run.folder, int(code or 0), failed)
    finally:
        keep.close()
        lifeline.close()
    return failed


def run_on_cluster(
    todo: list[Any],
    out: Path,
    scheduler: str | None,
    local_cluster: int | None,
    monitor: SweepMonitor,
    env: dict[str, str],
) -> dict[str, str]:
    """Each run is a dask task; a task whose worker is lost runs again elsewhere and resumes from its last.pt."""
    failed: dict[str, str] = {}
    with cluster_client(scheduler, local_cluster) as client:
        futures = {}
        for run in todo:
            folder = out / run.folder
            (folder / TASK_FILE).unlink(missing_ok=True)  # the worker writes it when it starts the run
            key = f"kdcache-run-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"
            futures[client.submit(run_student, str(folder), env, key=key, pure=False, retries=2)] = run
            monitor.queued(run)
        while futures:
            time.sleep(0.2)
            monitor.poll()
            for future in [f for f in futures if f.done()]:
                run = futures.pop(future)
                try:
                    code = future.result()
                except Exception as exc:  # the task itself failed on every worker it was given
                    code = 1
                    with (out / run.folder / "train.log").open("a") as log:
                        log.write(f"sweep: dask task failed: {exc}\n")
                if run.name in monitor.waiting:  # it ended before the sweep saw it start
                    monitor.started(run, False)
                report_end(monitor, run, out / run.folder, code, failed)
    return failed
