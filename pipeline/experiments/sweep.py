"""Many students from one cache: a SPEC's methods × grid × seeds as ordinary run folders, run side by side.

A SPEC is YAML whose top-level keys are ``train-student`` options every run shares; ``methods`` maps a name to its
own options, ``grid`` an option to a list of values (every method runs at every point of the product), ``seeds`` the
student seeds and ``reference`` published top-1 numbers. Each run lives in ``OUT/runs/<method>/<point>/seed-<s>/``
with ``run.json`` (what it is) beside the usual run files. A finished run is never redone, an interrupted one resumes
from its ``last.pt``, and a run whose planned settings changed is refused by name. A method that names a ``teacher``
checkpoint instead of a ``cache`` gets that teacher's cache dumped once into ``OUT/caches/``, shared by its runs,
unless it says ``online: true`` (the teacher then runs online in every step, as a reference).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, SupportsInt

from tqdm import tqdm

from kdcache.dump.cluster import check_scheduler, cluster_client
from kdcache.dump.loop import dump_logits
from kdcache.errors import KdcacheError
from kdcache.experiments.report import write_report
from kdcache.experiments.student import PLAN_FILE, train_plan
from kdcache.settings import SWEEP_DEFAULTS as W
from kdcache.settings import check_options, command_settings, resolve, write_settings
from kdcache.settings.files import NOT_IN_FILES, read_yaml
from kdcache.settings.files import parse_settings as parse_file_settings
from kdcache.settings.table import SWEEP, TRAIN
from kdcache.store.cache import check_output_dir, local_path, make_output_dir
from kdcache.store.checks import open_checked
from kdcache.train.config import TrainConfig
from kdcache.train.runfolder import finished_run
from kdcache.train.trainer import check_run

SPEC_KEYS = ("methods", "grid", "seeds", "reference", "dump")
ONLINE = "online"  # a method key (not a train-student option): run its teacher online instead of dumping a cache
#: train-student options a SPEC may not set: the sweep owns the run folder, seeds and resumption.
SWEEP_OWNED = ("out", "resume", "seed", "progress")
DUMP_OPTIONS = ("views", "dtype", "batch_size", "forward_block", "workers", "device", "amp", "view_seed", "format")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def parse_settings(data: dict, command: str, options: Collection[str], where: str | Path) -> dict[str, object]:
    """A SPEC block's settings for ``command``, limited to ``options`` (the keys a sweep lets a SPEC set)."""
    settings = parse_file_settings(data, command, where)
    other = sorted(set(settings) - set(options))
    if other:
        raise KdcacheError(f"{where}: {other[0].replace('_', '-')} cannot be set in a SPEC here: drop it")
    return settings


def train_options() -> set[str]:
    """The python names of the ``train-student`` settings a SPEC may set (those a ``--config`` file may hold, less
    what the sweep owns)."""
    return {s.name for s in command_settings(TRAIN)} - set(NOT_IN_FILES) - set(SWEEP_OWNED)


@dataclass(frozen=True)
class SweepRun:
    """One student run of a sweep: its method, grid point, seed and resolved ``train-student`` options."""

    method: str
    grid: dict[str, object]
    seed: int
    options: dict[str, object]
    reference: float | None = None
    order: int = 0
    online: bool = False

    @property
    def point(self) -> str:
        """The grid point's folder name: ``kd-weight=9,temperature=4``, or ``default`` without a grid."""
        return ",".join(f"{k}={_text(v)}" for k, v in self.grid.items()) or "default"

    @property
    def folder(self) -> Path:
        return Path("runs") / self.method / self.point / f"seed-{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.method}/{self.point}/seed-{self.seed}"

    @property
    def epochs(self) -> int:
        """The epochs the run trains: its options', else train-student's default."""
        epochs = self.options.get("epochs", TrainConfig.epochs)
        if not isinstance(epochs, SupportsInt | str):
            raise TypeError(f"epochs takes an integer, got {epochs!r}")
        return int(epochs)

    def record(self) -> dict[str, object]:
        """``run.json``: what the run is (read by the report) and the options it was planned with."""
        return {
            "method": self.method,
            "grid": self.grid,
            "point": self.point,
            "seed": self.seed,
            "epochs": self.epochs,
            "reference": self.reference,
            "order": self.order,
            "online": self.online,
            "options": _jsonable(self.options),
        }


@dataclass
class SweepSpec:
    """A parsed SPEC: shared options, methods, grid, seeds, references and dump options (python names)."""

    shared: dict[str, object]
    methods: dict[str, dict[str, object]]
    grid: dict[str, list[tuple[object, str, object]]]
    seeds: list[int]
    reference: dict[str, object] = field(default_factory=dict)
    dump: dict[str, object] = field(default_factory=dict)
    source: str = "SPEC"


def _text(value: object) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("/", "_").replace(" ", "")


def _jsonable(options: dict[str, object]) -> dict[str, object]:
    return json.loads(json.dumps(options, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def preset_path(name: str) -> Path:
    """The SPEC shipped as ``--preset name``."""
    folder = resources.files("kdcache.experiments") / "presets"
    path = Path(str(folder / f"{name}.yaml"))
    if not path.is_file():
        known = sorted(p.stem for p in Path(str(folder)).glob("*.yaml"))
        raise KdcacheError(f"unknown --preset {name!r}: choose one of {', '.join(known) or 'none'}")
    return path


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a SPEC file: every key an option, every method named, grid lists non-empty, seeds integers."""
    path = Path(path)
    data = read_yaml(path)
    options = train_options()
    owned = sorted(k for k in data if isinstance(k, str) and k.replace("-", "_") in SWEEP_OWNED)
    if owned:
        raise KdcacheError(
            f"{path}: {owned[0]} is set by the sweep (seeds: lists the seeds, --out the folder): drop it"
        )
    shared = parse_settings({k: v for k, v in data.items() if k not in SPEC_KEYS}, "train-student", options, path)
    methods = _methods(data.get("methods"), options, path)
    grid = _grid(data.get("grid"), options, path)
    seeds = _seeds(data.get("seeds", [0]), path)
    reference = data.get("reference") or {}
    unknown = sorted(set(reference) - set(methods)) if isinstance(reference, dict) else ["(not a mapping)"]
    if unknown:
        raise KdcacheError(f"{path}: reference names {unknown[0]!r}, which is not a method: use a name under methods:")
    dump = parse_settings(data.get("dump") or {}, "dump-logits", DUMP_OPTIONS, f"{path} dump:")
    return SweepSpec(shared, methods, grid, seeds, reference, dump, str(path))


def _methods(node: object, options: set[str], path: Path) -> dict[str, dict[str, object]]:
    if node is None:
        return {"default": {}}
    if not isinstance(node, dict) or not node:
        raise KdcacheError(f"{path}: methods: maps a method name to its options, e.g. kd-ls: {{logit-stand: true}}")
    methods = {}
    for name, opts in node.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise KdcacheError(f"{path}: method name {name!r} must be letters, digits and . _ + - (a folder name)")
        if not isinstance(opts, dict):
            raise KdcacheError(f"{path}: method {name} takes a mapping of options, got {opts!r}")
        online = opts.get("online", False)
        if not isinstance(online, bool):
            raise KdcacheError(f"{path}: method {name}: online takes true or false, got {online!r}")
        rest = {k: v for k, v in opts.items() if k != "online"}
        methods[name] = parse_settings(rest, "train-student", options, f"{path} method {name}:") | {ONLINE: online}
    return methods


def _grid(node: object, options: set[str], path: Path) -> dict[str, list[tuple[object, str, object]]]:
    """Per grid option, its values as written (they name the folders) with the option name and parsed value."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise KdcacheError(f"{path}: grid: maps an option to a list of values, e.g. kd-weight: [1, 9]")
    grid = {}
    for key, values in node.items():
        if not isinstance(values, list) or not values:
            raise KdcacheError(f"{path}: grid {key} needs a non-empty list of values, got {values!r}")
        parsed = [parse_settings({key: v}, "train-student", options, f"{path} grid:") for v in values]
        grid[key] = [(v, *next(iter(p.items()))) for v, p in zip(values, parsed, strict=True)]
    return grid


def _seeds(node: object, path: Path) -> list[int]:
    seeds = node if isinstance(node, list) else []
    ok = bool(seeds) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not ok or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise KdcacheError(
            f"{path}: seeds: takes a list of distinct integers 0 or more, such as [0, 1, 2], not {node!r}"
        )
    return list(seeds)


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every run of the SPEC, method by method, grid point by point, seed by seed."""
    runs = []
    for order, (method, opts) in enumerate(spec.methods.items()):
        online = bool(opts.get(ONLINE, False))
        own = {k: v for k, v in opts.items() if k != ONLINE}
        for combo in itertools.product(*spec.grid.values()):
            grid = {key: raw for key, (raw, _, _) in zip(spec.grid, combo, strict=True)}
            point_options = {**spec.shared, **own, **{name: value for _, name, value in combo}}
            reference = _reference(spec.reference.get(method), grid)
            for seed in spec.seeds:
                options = {**point_options, "seed": seed}
                runs.append(SweepRun(method, grid, seed, options, reference, order, online))
    return runs


def _reference(node: object, grid: dict[str, object]) -> float | None:
    """A method's published top-1: one number, or one per grid point (``{kd-weight=9: 76.6}``)."""
    if isinstance(node, int | float) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, dict):
        point = ",".join(f"{k}={_text(v)}" for k, v in grid.items()) or "default"
        value = node.get(point)
        return float(value) if isinstance(value, int | float) else None
    return None


def cache_plan(run: SweepRun, dump: dict[str, object], out: Path) -> dict[str, object] | None:
    """The dump a run needs when its method names a teacher checkpoint instead of a cache (None when it has one)."""
    o = run.options
    if run.online or o.get("cache") or not o.get("teacher") or o.get("loss") == "ce":
        return None
    dataset = str(o.get("dataset"))
    augment = "mlkd" if o.get("loss") == "mlkd" else o.get("augment") or _default_augment(dataset)
    views = dump.get("views", "all" if augment == "cifar" else o.get("epochs", TrainConfig.epochs))
    plan = {
        "teacher": o["teacher"],
        "checkpoint": o.get("checkpoint"),
        "weights": o.get("weights"),
        "dataset": dataset,
        "data_root": o.get("data_root"),
        "augment": augment,
        "views": str(views),
        "mix": o.get("mix") or "none",
        "mix_alpha": o.get("mix_alpha", 1.0),
        **{k: v for k, v in dump.items() if k != "views"},
    }
    named = {("seed" if k == "view_seed" else k): v for k, v in plan.items()}  # the key caches were first named by
    key = hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:10]
    plan["out"] = str(out / "caches" / f"{_text(o['teacher'])}.{augment}.{key}.zarr")
    return plan


def _default_augment(dataset: str) -> str:
    return "cifar" if dataset in ("cifar100", "digits") else "imagenet"


def _caches(options: Mapping[str, object]) -> list[str]:
    """A run's ``cache`` option as a list of locations (a SPEC's is a list already; one location may be text)."""
    caches = options.get("cache") or []
    if isinstance(caches, str):
        return [caches]
    if not isinstance(caches, Iterable):
        raise TypeError(f"cache takes a store path or a list of them, got {caches!r}")
    return list(caches)


def check_caches(runs: list[SweepRun]) -> None:
    """Every named cache opens (exists, is a kdcache store) before any run starts."""
    seen: set[str] = set()
    for run in runs:
        for cache in _caches(run.options):
            if cache in seen:
                continue
            seen.add(cache)
            lp = local_path(cache)
            if lp is not None and not lp.exists():
                raise KdcacheError(
                    f"run {run.name}: cache {cache} does not exist: dump it first or fix the SPEC's cache"
                )
            open_checked(cache)


def check_runs(runs: list[SweepRun], ready: list[SweepRun], dumps: dict[str, dict]) -> None:
    """Every run passes train-student's checks, every existing cache matches its run's data, and every planned dump
    has its teacher checkpoint and valid options, before anything is written (the first failure names the run)."""
    seen: set[str] = set()
    for run in runs:
        key = json.dumps({k: v for k, v in run.options.items() if k != "seed"}, sort_keys=True, default=str)
        try:
            if key in seen:  # the same run but for its seed
                check_options({"seed": run.seed})
            else:
                check_run(run.options, caches=run in ready)
        except KdcacheError as exc:
            raise KdcacheError(f"run {run.name}: {exc}") from None
        seen.add(key)
    for location, plan in dumps.items():
        check_options(plan)
        ckpt = plan.get("checkpoint")
        lp = local_path(str(ckpt)) if ckpt else None
        if lp is not None and not lp.is_file():
            raise KdcacheError(f"the dump of {location} needs the teacher checkpoint {ckpt}, which does not exist")


def check_planned(runs: list[SweepRun], out: Path) -> None:
    """Refuse a run folder that exists with other planned options (naming the run and the setting), as --resume does."""
    for run in runs:
        path = out / run.folder / "run.json"
        if not path.exists():
            continue
        stored = json.loads(path.read_text()).get("options", {})
        planned = _jsonable(run.options)  # as run.json records them
        diff = sorted(k for k in stored.keys() | planned.keys() if stored.get(k) != planned.get(k))
        if diff:
            k = diff[0]
            raise KdcacheError(
                f"sweep run {run.name} in {out} was planned with {k} {stored.get(k)!r}, the SPEC now gives "
                f"{planned.get(k)!r}: restore the SPEC, or sweep into another --out"
            )


@dataclass
class SweepResult:
    """How a sweep ended: every run, and the ones that failed (with the last line of their log)."""

    out: Path
    runs: list[SweepRun]
    failed: dict[str, str] = field(default_factory=dict)


def prepare(spec: SweepSpec, out: str | Path, scheduler: str | None = None, local_cluster: int | None = None) -> list:
    """Check everything a sweep needs, dump the caches its methods name by teacher, and write each run's plan."""
    out = check_output_dir(out)
    runs, dumps = _with_caches(expand(spec), spec.dump, out)
    check_planned(runs, out)
    ready = [r for r in runs if not any(c in dumps for c in _caches(r.options))]
    check_caches(ready)
    check_runs(runs, ready, dumps)
    make_output_dir(out)
    for location, plan in dumps.items():
        tqdm.write(f"sweep: dumping {plan['teacher']} ({plan['augment']} views) once into {location}")
        dump_logits(**plan, scheduler=scheduler, local_cluster=local_cluster)
    for run in runs:
        folder = out / run.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(json.dumps(run.record(), indent=1) + "\n")
        write_settings({**run.options, "cache_scratch": str(out / "scratch")}, folder / PLAN_FILE)
    return runs


def _with_caches(runs: list[SweepRun], dump: dict, out: Path) -> tuple[list[SweepRun], dict[str, dict]]:
    """Runs whose method names a teacher checkpoint, pointed at that teacher's cache, and the dumps (by location)
    those caches need (each dumped once, resumably); online methods keep their teacher and drop any cache."""
    dumps: dict[str, dict] = {}
    placed = []
    for run in runs:
        if run.online:
            placed.append(dataclasses.replace(run, options={k: v for k, v in run.options.items() if k != "cache"}))
            continue
        plan = cache_plan(run, dump, out)
        if plan is None:
            placed.append(run)
            continue
        location = str(plan["out"])  # text: cache_plan made it
        dumps.setdefault(location, plan)
        options = {k: v for k, v in run.options.items() if k not in ("checkpoint", "weights")}
        placed.append(dataclasses.replace(run, options={**options, "cache": [location]}))
    return placed, dumps


def _command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "kdcache.experiments.student", str(folder)]


def _die_with_parent() -> None:
    """In a child: be killed when the sweep (or dask worker) that started it dies, so no student runs on orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_student(folder: str | Path, env: dict[str, str] | None = None) -> int:
    """Run (or resume) one sweep run's ``train-student`` in a child process; its exit code. Output goes to train.log."""
    folder = Path(folder)
    with (folder / "train.log").open("a") as log:
        proc = subprocess.run(
            _command(folder),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONWARNINGS": "ignore"},
            preexec_fn=_die_with_parent,
        )
    return proc.returncode


def _last_line(folder: Path) -> str:
    lines = [x for x in (folder / "train.log").read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def _slots(parallel: int, per_gpu: int, threads: int) -> list[dict[str, str]]:
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


class _Progress:
    """One line per run state change and an overall bar (runs done, ETA)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, unit="run", desc="sweep", disable=None if enabled else True)

    def line(self, run: SweepRun, state: str) -> None:
        tqdm.write(f"{state:<9} {run.name}")

    def finished(self, run: SweepRun, folder: Path, code: int, failed: dict[str, str]) -> None:
        history = finished_run(folder, run.epochs)
        if code == 0 and history:
            top1 = history[-1]["test_top1"]
            self.line(run, "finished")
            tqdm.write(f"{'':<9} last-epoch test top-1 {top1:.2f}%  ({sum(h['seconds'] for h in history):.1f} s)")
        else:
            failed[run.name] = _last_line(folder)
            self.line(run, "failed")
            tqdm.write(f"{'':<9} {failed[run.name]}  (log: {folder / 'train.log'})")
        self.bar.update(1)


def _student_process(folder: str, env: dict[str, str]) -> None:
    """A forked student: its environment and threads, its log, then ``train-student`` on its plan (exit 2 on a
    refusal, as the command would)."""
    import torch

    # Its parent is the fork server, which exits with the sweep once no child holds its alive pipe open.
    alive = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
    _die_with_parent()
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
        context.set_forkserver_preload(["torch", "kdcache.train.trainer", "kdcache.experiments.student"])
        return context
    return multiprocessing.get_context("spawn")


def _run_local(todo: list[SweepRun], out: Path, slots: list[dict[str, str]], progress: _Progress) -> dict[str, str]:
    """Run the students, ``len(slots)`` at a time, each in its own process."""
    context = _fork_server()
    failed: dict[str, str] = {}
    active: dict[multiprocessing.process.BaseProcess, tuple[SweepRun, int]] = {}
    pending, free = list(todo), list(range(len(slots)))
    while pending or active:
        while pending and free:
            run, slot = pending.pop(0), free.pop(0)
            folder = out / run.folder
            progress.line(run, "resumed" if (folder / "last.pt").exists() else "started")
            proc = context.Process(target=_student_process, args=(str(folder), slots[slot]), daemon=False)
            proc.start()
            active[proc] = (run, slot)
        time.sleep(0.1)
        for ended, code in [(p, p.exitcode) for p in active if p.exitcode is not None]:
            run, slot = active.pop(ended)
            free.append(slot)
            progress.finished(run, out / run.folder, code, failed)
    return failed


def _run_on_cluster(
    todo: list[SweepRun],
    out: Path,
    scheduler: str | None,
    local_cluster: int | None,
    progress: _Progress,
    env: dict[str, str],
) -> dict[str, str]:
    """Each run is a dask task; a task whose worker is lost runs again elsewhere and resumes from its last.pt."""
    from distributed import as_completed

    failed: dict[str, str] = {}
    with cluster_client(scheduler, local_cluster) as client:
        futures = {}
        for run in todo:
            key = f"kdcache-run-{hashlib.sha256(str(out / run.folder).encode()).hexdigest()[:16]}"
            futures[client.submit(run_student, str(out / run.folder), env, key=key, pure=False, retries=2)] = run
            progress.line(run, "queued")
        for future in as_completed(futures):
            run = futures[future]
            try:
                code = future.result()
            except Exception as exc:  # the task itself failed on every worker it was given
                code = 1
                (out / run.folder / "train.log").open("a").write(f"sweep: dask task failed: {exc}\n")
            progress.finished(run, out / run.folder, code, failed)
    return failed


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    parallel: int = W.parallel,
    per_gpu: int = W.per_gpu,
    threads: int = W.threads,
    local_cluster: int | None = W.local_cluster,
    scheduler: str | None = W.scheduler,
    progress: bool = True,
) -> SweepResult:
    """Run every not yet finished run of ``spec`` into ``out`` (locally ``parallel`` at a time with ``threads`` CPU
    threads each, or on dask), then write the report (``summary.csv``, ``results.md``, ``curves.png``)."""
    if local_cluster is not None and scheduler is not None:
        raise KdcacheError("pass either --local-cluster N or --scheduler ADDRESS, not both")
    check_scheduler(scheduler)
    slots = _slots(parallel, per_gpu, threads) if local_cluster is None and scheduler is None else []
    runs = prepare(spec, out, scheduler, local_cluster)
    out = Path(out)
    todo = [r for r in runs if not finished_run(out / r.folder, r.epochs)]
    bar = _Progress(len(runs), len(runs) - len(todo), progress)
    for run in runs:
        if run not in todo:
            bar.line(run, "finished")
    if todo and slots:
        failed = _run_local(todo, out, slots, bar)
    elif todo:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        failed = _run_on_cluster(todo, out, scheduler, local_cluster, bar, env)
    else:
        failed = {}
    bar.bar.close()
    write_report(out)
    return SweepResult(out, runs, failed)


__all__ = ["SweepSpec", "SweepRun", "SweepResult", "load_spec", "preset_path", "expand", "prepare", "run_sweep"]


def sweep_command(spec: str | Path | None = None, **given: object) -> tuple[list[str], list[str]]:
    """What ``kdcache sweep`` does with a SPEC (or ``preset``) and its settings: the lines it prints and the runs
    that failed. ``report=True`` only rebuilds the report of the runs in ``out``."""
    settings: dict[str, Any] = resolve(SWEEP, None, given)  # mixed settings, checked just below
    check_options(settings)
    out = Path(str(settings.pop("out")))
    preset = settings.pop("preset", None)
    if settings.pop("report", False):
        return [f"report     {p}" for p in write_report(out).paths], []
    if (spec is None) == (preset is None):
        raise KdcacheError("give a SPEC.yaml or --preset NAME (one of them)")
    result = run_sweep(load_spec(spec or preset_path(str(preset))), out, **settings)
    done = len(result.runs) - len(result.failed)
    lines = [f"results    {out / 'results.md'}  ({done} of {len(result.runs)} runs)"]
    return lines, [f"{name}: {line}" for name, line in result.failed.items()]
