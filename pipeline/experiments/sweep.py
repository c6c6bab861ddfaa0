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
import dataclasses
import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, SupportsInt

import yaml
from tqdm import tqdm

from kdcache.dump.cluster import check_scheduler
from kdcache.dump.loop import dump_logits
from kdcache.errors import KdcacheError
from kdcache.experiments.launch import run_local, run_on_cluster, slots
from kdcache.experiments.monitor import SweepMonitor
from kdcache.experiments.preflight import check_inputs, work_ahead
from kdcache.experiments.report import (
    MANIFEST_FILE,
    PRUNED_DIR,
    SPEC_FILE,
    read_manifest,
    stale_runs,
    write_manifest,
    write_report,
)
from kdcache.experiments.student import PLAN_FILE
from kdcache.settings import SWEEP_DEFAULTS as W
from kdcache.settings import check_options, command_settings, resolve, write_settings
from kdcache.settings.files import NOT_IN_FILES, read_yaml
from kdcache.settings.files import parse_settings as parse_file_settings
from kdcache.settings.table import SWEEP, TRAIN
from kdcache.store.cache import IDENTITY_FIELDS, check_output_dir, local_path, make_output_dir, open_store
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
    preset: str | None = None  # the --preset it was loaded as: its work ahead is stated, on a CPU it needs --yes


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
    _check_grid_clashes(shared, methods, grid, path)
    seeds = _seeds(data.get("seeds", [0]), path)
    reference = _references(data.get("reference") or {}, methods, grid, options, path)
    dump = parse_settings(data.get("dump") or {}, "dump-logits", DUMP_OPTIONS, f"{path} dump:")
    return SweepSpec(shared, methods, grid, seeds, reference, dump, str(path))


def _check_grid_clashes(shared: dict, methods: dict[str, dict], grid: dict[str, list], path: Path) -> None:
    """A grid option the SPEC's top level or a method also sets is refused by name: the grid's values win, so the
    other value would never be used."""
    for key, values in grid.items():
        name = values[0][1]
        for method, opts in methods.items():
            if name in opts:
                raise KdcacheError(
                    f"{path}: method {method} sets {key}: {_text(opts[name])}, which the grid also sets (its values "
                    f"win, so {_text(opts[name])} is never used): drop {key} from the method or from the grid"
                )
        if name in shared:
            raise KdcacheError(
                f"{path}: {key}: {_text(shared[name])} at the top level is never used, the grid sets {key}: drop "
                "one of them"
            )


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
        seen: dict[str, object] = {}
        for raw, _, value in grid[key]:
            canonical = _canonical(value)
            if canonical in seen:
                same = seen[canonical]
                raise KdcacheError(
                    f"{path}: grid {key} lists {_text(same)} and {_text(raw)}, the same value (two folders of one "
                    "run): list each value once"
                )
            seen[canonical] = raw
    return grid


def _canonical(value: object) -> str:
    """A parsed setting as comparable text: 4 and 4.0 of a float setting are one value."""
    return json.dumps(value, sort_keys=True, default=str)


_KEY_PART = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_-]*\s*=)")  # a comma that starts the next option=value


def _references(
    node: object, methods: dict[str, dict], grid: dict[str, list], options: set[str], path: Path
) -> dict[str, object]:
    """The SPEC's ``reference:`` with every number checked and every per-point key parsed as a grid point (its
    folder name): ``{temperature=2.0: 80}`` under ``grid: {temperature: [2, 4]}`` is point ``temperature=2``."""
    if not isinstance(node, dict):
        raise KdcacheError(f"{path}: reference: maps a method to its published top-1, e.g. kd: 73.33; not {node!r}")
    found: dict[str, object] = {}
    for method, value in node.items():
        if method not in methods:
            raise KdcacheError(f"{path}: reference names {method!r}, which is not a method: use a name under methods:")
        where = f"{path}: reference {method}"
        if isinstance(value, dict):
            points = {
                _reference_point(key, grid, options, where): _number(v, f"{where} {key}") for key, v in value.items()
            }
            found[method] = points
        else:
            found[method] = _number(value, where)
    return found


def _number(value: object, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        raise KdcacheError(f"{where}: {value!r} is text, not a number: write the published top-1 without quotes")
    raise KdcacheError(f"{where}: takes the published top-1 (%) as a number, or one per grid point; got {value!r}")


def _reference_point(key: object, grid: dict[str, list], options: set[str], where: str) -> str:
    """The grid point a per-point reference key names (its folder name); a key that names no point is refused."""
    names = {k.replace("_", "-"): k for k in grid}
    if not isinstance(key, str):
        raise KdcacheError(f"{where}: key {key!r} is not option=value: write e.g. {_example(grid)}")
    if key.strip() == "default" and not grid:
        return "default"
    given: dict[str, object] = {}
    for part in _KEY_PART.split(key):
        option, eq, text = part.partition("=")
        option = option.strip().replace("_", "-")
        if not eq or option not in names:
            known = ", ".join(grid) or "no options (use the key default, or one number)"
            raise KdcacheError(
                f"{where}: key {key!r} names {option!r}, which is not a grid option (the grid has {known})"
            )
        if names[option] in given:
            raise KdcacheError(f"{where}: key {key!r} names {option} twice: name it once")
        given[names[option]] = _key_value(text)
    missing = [k for k in grid if k not in given]
    if missing:
        raise KdcacheError(
            f"{where}: key {key!r} gives no value for {missing[0]}: a key names a whole grid point, "
            f"e.g. {_example(grid)}"
        )
    parts = []
    for option, values in grid.items():
        value = parse_settings({option: given[option]}, "train-student", options, f"{where} key {key!r}:")
        match = [raw for raw, _, v in values if _canonical(v) == _canonical(next(iter(value.values())))]
        if not match:
            listed = ", ".join(_text(raw) for raw, _, _ in values)
            raise KdcacheError(f"{where}: key {key!r}: {option} {_text(given[option])} is not in the grid ({listed})")
        parts.append(f"{option}={_text(match[0])}")
    return ",".join(parts)


def _key_value(text: str) -> object:
    """A value in a reference key as YAML reads it (``2.0``, ``true``, ``'4'``), so it is parsed as the grid's are."""
    try:
        return yaml.safe_load(text.strip()) if text.strip() else text
    except yaml.YAMLError:
        return text.strip()


def _example(grid: dict[str, list]) -> str:
    return ",".join(f"{k}={_text(v[0][0])}" for k, v in grid.items()) or "default"


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
    has valid options, before anything is written (the first failure names the run)."""
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
    for plan in dumps.values():  # their checkpoints: check_inputs named every missing one before
        check_options(plan)


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


def prepare(
    spec: SweepSpec,
    out: str | Path,
    scheduler: str | None = None,
    local_cluster: int | None = None,
    *,
    prune: bool = W.prune,
    yes: bool = W.yes,
    parallel: int = W.parallel,
    threads: int = W.threads,
) -> list:
    """Check everything a sweep needs (its data, teacher checkpoints and device before the first dump; a preset's
    work ahead), set aside the runs the SPEC no longer names (``prune``), copy the SPEC into ``out`` as
    ``spec.yaml``, dump the caches its methods name by teacher, and write each run's plan and ``sweep.json``."""
    out = check_output_dir(out)
    runs, dumps = _with_caches(expand(spec), spec.dump, out)
    check_planned(runs, out)
    sizes = check_inputs(runs, dumps, spec.preset, spec.source)
    ready = [r for r in runs if not any(c in dumps for c in _caches(r.options))]
    check_caches(ready)
    check_runs(runs, ready, dumps)
    if spec.preset:
        todo = [r for r in runs if not finished_run(out / r.folder, r.epochs)]
        fresh = sum(not _exists(location) for location in dumps)
        _say("sweep: " + work_ahead(spec.preset, runs, todo, fresh, sizes, parallel, threads, yes))
    make_output_dir(out)
    _set_aside(out, [r.name for r in runs], prune)
    _copy_spec(spec, out)
    write_manifest(out, sweep_manifest(spec, runs))
    for location, plan in dumps.items():
        _say(f"sweep: dumping {plan['teacher']} ({plan['augment']} views) once into {location}")
        dump_logits(**plan, scheduler=scheduler, local_cluster=local_cluster)
    for run in runs:
        folder = out / run.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(json.dumps(run.record(), indent=1) + "\n")
        write_settings({**run.options, "cache_scratch": str(out / "scratch")}, folder / PLAN_FILE)
    write_manifest(out, sweep_manifest(spec, runs))  # now with the ids of the caches just dumped
    return runs


def _say(line: str) -> None:
    tqdm.write(line)
    sys.stdout.flush()


def _exists(location: str) -> bool:
    lp = local_path(location)
    return lp is None or (lp / "zarr.json").exists()


def _set_aside(out: Path, names: list[str], prune: bool) -> list[str]:
    """The run folders in ``out/runs`` that the SPEC no longer names: moved to ``out/pruned/`` with ``prune``, else
    said (the report lists them and leaves them out)."""
    stale = stale_runs(out, names)
    if stale and not prune:
        _say(
            f"sweep: {len(stale)} run folder{'s' if len(stale) > 1 else ''} in {out / 'runs'} "
            f"{'are' if len(stale) > 1 else 'is'} not in this SPEC: the report lists and leaves them out "
            "(--prune moves them aside)"
        )
        return []
    for name in stale:
        source, target = out / "runs" / name, out / PRUNED_DIR / "runs" / name
        for i in itertools.count(2):
            if not target.exists():
                break
            target = out / PRUNED_DIR / "runs" / f"{name}.{i}"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        for parent in (source.parent, source.parent.parent):  # the point and method folders, once empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        _say(f"{'pruned':<9} {name} -> {target.relative_to(out)}")
    return stale


def _copy_spec(spec: SweepSpec, out: Path) -> None:
    """The SPEC as ``out/spec.yaml``: the file itself (comments and all), or its parsed form when it has none."""
    target = out / SPEC_FILE
    source = Path(spec.source)
    if source.is_file():
        if target.exists() and source.resolve() == target.resolve():
            return
        data = source.read_bytes()
    else:
        body = {k.replace("_", "-"): v for k, v in spec.shared.items()}
        body["methods"] = {m: {k.replace("_", "-"): v for k, v in o.items()} for m, o in spec.methods.items()}
        body["grid"] = {k: [raw for raw, _, _ in values] for k, values in spec.grid.items()}
        body |= {"seeds": spec.seeds, "reference": spec.reference}
        data = yaml.safe_dump(json.loads(json.dumps(body, default=str)), sort_keys=False).encode()
    tmp = target.with_name(target.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(target)


def cache_id(location: str) -> str | None:
    """A short, stable id of a cache: the hash of its identity attributes (teacher and checkpoint hash, data
    fingerprint, recipe, view seed, dtype, ...), equal for two stores of the same logits; None if it cannot be read."""
    try:
        attrs = open_store(location).attrs
    except (KdcacheError, OSError, ValueError):
        return None
    identity = {k: attrs.get(k) for k in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sweep_manifest(spec: SweepSpec, runs: list[SweepRun]) -> dict[str, object]:
    """``sweep.json``: the runs this SPEC names (in its order), its seeds and shared settings, kdcache's version,
    and the id of every cache that exists."""
    from kdcache import __version__

    locations = list(dict.fromkeys(c for r in runs for c in _caches(r.options)))
    caches = [{"location": c, "name": Path(c).name, "id": cache_id(c)} for c in locations if _exists(c)]
    return {
        "kdcache": __version__,
        "spec": SPEC_FILE,
        "source": str(spec.source),
        "preset": spec.preset,
        "seeds": spec.seeds,
        "shared": _jsonable({k.replace("_", "-"): v for k, v in spec.shared.items()}),
        "caches": [c for c in caches if c["id"] is not None],
        "runs": [r.name for r in runs],
    }


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
    prune: bool = W.prune,
    yes: bool = W.yes,
) -> SweepResult:
    """Run every not yet finished run of ``spec`` into ``out`` (locally ``parallel`` at a time with ``threads`` CPU
    threads each, or on dask), then write the report (``summary.csv``, ``results.md``, ``curves.png``) of exactly
    the SPEC's runs. ``prune`` moves the run folders the SPEC no longer names to ``out/pruned/``; ``yes`` lets a
    preset start on a machine without a GPU. ``progress`` adds the per-epoch display (or lines, off a terminal)."""
    if local_cluster is not None and scheduler is not None:
        raise KdcacheError("pass either --local-cluster N or --scheduler ADDRESS, not both")
    check_scheduler(scheduler)
    envs = slots(parallel, per_gpu, threads) if local_cluster is None and scheduler is None else []
    runs = prepare(spec, out, scheduler, local_cluster, prune=prune, yes=yes, parallel=parallel, threads=threads)
    out = Path(out)
    todo = [r for r in runs if not finished_run(out / r.folder, r.epochs)]
    monitor = SweepMonitor(runs, out, enabled=progress)
    try:
        for run in runs:
            if run not in todo:
                monitor.line(run, "finished")
        if todo and envs:
            failed = run_local(todo, out, envs, monitor)
        elif todo:
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            failed = run_on_cluster(todo, out, scheduler, local_cluster, monitor, env)
        else:
            failed = {}
    finally:
        monitor.close()
    write_report(out)
    return SweepResult(out, runs, failed)


__all__ = ["SweepSpec", "SweepRun", "SweepResult", "load_spec", "preset_path", "expand", "prepare", "run_sweep"]


def sweep_command(spec: str | Path | None = None, **given: object) -> tuple[list[str], list[str]]:
    """What ``kdcache sweep`` does with a SPEC (or ``preset``) and its settings: the lines it prints and the runs
    that failed. ``report=True`` only rebuilds the report of the runs in ``out`` (those of the SPEC last swept into
    it, by its ``sweep.json``), after moving aside the runs that SPEC does not name with ``prune``."""
    settings: dict[str, Any] = resolve(SWEEP, None, given)  # mixed settings, checked just below
    check_options(settings)
    out = Path(str(settings.pop("out")))
    preset = settings.pop("preset", None)
    if settings.pop("report", False):
        lines = []
        if settings.get("prune"):
            manifest = read_manifest(out)
            if manifest is None:
                raise KdcacheError(
                    f"--prune --report needs {out / MANIFEST_FILE}, which a sweep of this kdcache writes: run the "
                    "sweep with --prune instead"
                )
            lines = [f"pruned     {name}" for name in _set_aside(out, [str(n) for n in manifest["runs"]], True)]
        return lines + [f"report     {p}" for p in write_report(out).paths], []
    if (spec is None) == (preset is None):
        raise KdcacheError("give a SPEC.yaml or --preset NAME (one of them)")
    loaded = load_spec(spec or preset_path(str(preset)))
    loaded.preset = None if preset is None else str(preset)
    result = run_sweep(loaded, out, **settings)
    done = len(result.runs) - len(result.failed)
    lines = [f"results    {out / 'results.md'}  ({done} of {len(result.runs)} runs)"]
    return lines, [f"{name}: {line}" for name, line in result.failed.items()]
