"""Stage two: train a student from cached teacher logits (or an online teacher, or CE alone).

Shaped like torchvision's ``references/classification``: the settings are
resolved once (:class:`TrainConfig`), the batches (:class:`~kdcache.feed.batches.DistillLoader`)
and the objective (:class:`~kdcache.losses.objective.Objective`) are built once, then
each epoch sets the LR, runs :func:`train_one_epoch` and :func:`evaluate`, logs
and saves. Epoch numbers are 1-based and the step LR counts milestones the
epoch is strictly past, as mdistiller does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdcache.dataset.datasets import build_dataset, check_dataset, test_split
from kdcache.errors import KdcacheError
from kdcache.feed.batches import DistillLoader, eval_loader, open_caches
from kdcache.feed.ranks import Ranks, init_ranks
from kdcache.losses.functions import CTKDTemperature
from kdcache.losses.objective import Objective, parse_loss_opts
from kdcache.models.checkpoints import load_checkpoint
from kdcache.models.factory import create_model
from kdcache.progress import say
from kdcache.settings import TRAIN_DEFAULTS as T
from kdcache.settings import check_options, old_names, read_values, write_settings
from kdcache.settings.table import TRAIN
from kdcache.store.cache import check_output_dir
from kdcache.teacher.runner import Teacher, load_teacher
from kdcache.train.config import TrainConfig
from kdcache.train.evaluation import evaluate
from kdcache.train.precision import Precision
from kdcache.train.runfolder import check_resume, restore, resume_state, run_lock, save_run, stored_record
from kdcache.train.runlog import RunLog


@dataclass
class TrainResult:
    """Where a run wrote its files and how it ended."""

    out: Path
    best_top1: float
    last: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    main: bool = True  # False on torchrun ranks other than 0, which report nothing

    @property
    def best_epoch(self) -> int | None:
        """The first epoch that reached ``best_top1`` (the one ``best.pt`` holds), or None without a history."""
        return next((int(h["epoch"]) for h in self.history if h["test_top1"] == self.best_top1), None)


def build_objective(cfg: TrainConfig, device: torch.device) -> Objective:
    """The loss of a resolved config, built once: its function, options, weights, warm-up and CTKD temperature."""
    spec = cfg.spec
    assert cfg.ce_weight is not None and cfg.kd_weight is not None, "build_objective takes TrainConfig.resolved()"
    options = {k: getattr(cfg, k) for k in spec.options} if spec.builtin else dict(cfg.loss_opt)
    ctkd = None
    if cfg.ctkd:
        ctkd = CTKDTemperature(
            cfg.ctkd_t_start,
            cfg.ctkd_t_end,
            curriculum=cfg.ctkd_decay_epochs,
            decay=cfg.ctkd_decay,
            decay_max=cfg.ctkd_decay_max,
            decay_min=cfg.ctkd_decay_min,
        )
    objective = Objective(spec, options, cfg.ce_weight, cfg.kd_weight, cfg.warmup, cfg.teacher_fix, ctkd)
    return objective.to(device)


def check_signal(cfg: TrainConfig, loader: DistillLoader) -> None:
    """Refuse a loss the loader's teacher signal cannot feed (top-K rows, mixed views, one view kind)."""
    spec = cfg.spec
    if spec.fn is not None and not loader.stores and loader.online is None:
        raise KdcacheError(
            f"--loss {cfg.loss} needs a teacher signal: pass --cache STORE or --teacher NAME --checkpoint PATH"
        )
    topk_store = loader.store if loader.format.is_topk else None  # a top-K format comes from a cache
    if topk_store is not None and spec.fn is not None and (not spec.topk or cfg.teacher_fix != "none"):
        what = f"--teacher-fix {cfg.teacher_fix}" if spec.topk else f"--loss {cfg.loss}"
        raise KdcacheError(
            f"{what} needs every teacher logit, but {topk_store.location} is a {loader.format} cache: use --loss "
            "kd or dkd with it, or dump with --format full"
        )
    if loader.recipe.mix != "none" and (not spec.mixed or cfg.teacher_fix != "none"):
        fix = f" --teacher-fix {cfg.teacher_fix}" if cfg.teacher_fix != "none" else ""
        raise KdcacheError(
            f"{loader.recipe.mix} views have two target classes, so --loss {cfg.loss}{fix} is undefined on them: "
            "use --loss kd (or ce), or views without --mix"
        )


def build_student(
    cfg: TrainConfig, num_classes: int, device: torch.device, ranks: Ranks
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student (seeded by ``cfg.seed``) and the module the loop calls (DDP-wrapped, compiled)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.student, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if ranks.world > 1:
        # static_graph: MLKD runs the student twice (weak, strong) before one backward.
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]  # torch types it a Callable; a Module's is a Module
    return model, net


def train_one_epoch(
    net: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    loader: DistillLoader,
    epoch: int,
    precision: Precision,
    scaler: torch.amp.GradScaler,
    ranks: Ranks | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over the loader's epoch ``epoch`` (1-based); the mean total loss and its unweighted parts."""
    ranks = ranks or Ranks()
    net.train()
    loader.set_epoch(epoch - 1)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    desc = f"epoch {epoch}/{loader.epochs}" if loader.epochs else f"epoch {epoch}"
    bar = tqdm(loader, desc=desc, unit="batch", disable=None if progress else True, dynamic_ncols=True, leave=False)
    for batch in bar:
        with precision.autocast():
            student = [net(precision.inputs(x)) for x in batch.views]
            total, parts = objective(student, batch.teacher, batch.labels, epoch, batch.mixed)
        if not torch.isfinite(total):
            raise KdcacheError(f"training diverged at epoch {epoch} (loss {float(total)}): lower --lr or --kd-weight")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        ranks.average_grads(list(objective.parameters()))  # CTKD's temperature is outside DDP's student
        scaler.step(optimizer)
        scaler.update()
        n = len(batch.ids)
        for key, value in {"loss": total, **parts}.items():
            sums[key] = sums.get(key, 0) + value.detach().double() * n
        seen += n
        bar.set_postfix(loss=f"{float(sums['loss']) / seen:.4f}")
    bar.close()
    keys = list(sums)
    totals = ranks.sum([float(sums[k]) for k in keys] + [seen])
    return {f"train_{k}": v / max(totals[-1], 1) for k, v in zip(keys, totals[:-1], strict=True)}


#: train_student arguments that say where and how to report, not what to train (left out of config.yaml).
NOT_SETTINGS = ("out", "resume", "progress", "hyper")


@old_names(teacher_weights="cache_weights")
def train_student(
    *,
    student: str,
    dataset: str,
    out: str | Path,
    loss: str = T.loss,
    cache: str | list[str] | None = T.cache,
    cache_weights: str | list[float] | None = T.cache_weights,
    teacher_mix: str = T.teacher_mix,
    cache_views: int | None = T.cache_views,
    teacher: str | None = T.teacher,
    checkpoint: str | None = T.checkpoint,
    weights: str | None = T.weights,
    augment: str | None = T.augment,
    mix: str | None = T.mix,
    mix_alpha: float = T.mix_alpha,
    views: str | int | None = T.views,
    view_seed: int = T.view_seed,
    forward_block: int = T.forward_block,
    data_root: str | None = T.data_root,
    download: bool = T.download,
    workers: int = T.workers,
    device: str = T.device,
    resume: bool = T.resume,
    verify_views: bool = T.verify_views,
    plot: str | bool | None = T.plot,
    progress: bool = True,
    cache_memory: int | str = T.cache_memory,
    cache_scratch: str | None = T.cache_scratch,
    cache_dir: str | None = T.cache_dir,
    view_schedule: str | None = T.view_schedule,
    **hyper: object,
) -> TrainResult:
    """Train ``student`` and write ``config.yaml``, ``metrics.jsonl``, ``last.pt`` and ``best.pt`` into ``out``.

    Teacher signal comes from ``cache`` (a dump-logits store, or a list of
    stores of the same views from several teachers, combined per
    ``teacher_mix`` with ``cache_weights``), or from an online ``teacher``
    run on the same views (``augment``, ``mix``, ``mix_alpha``, ``views``,
    ``view_seed``; ``weights`` names torchvision weights); ``loss="ce"`` needs
    neither. With ``cache``, ``teacher`` only checks which teacher the cache holds.
    ``view_schedule`` picks how a seeded cache's views are drawn per epoch
    (:func:`kdcache.feed.logits.epoch_views`; ``chunk`` for a new run, the run's own on ``resume``).
    ``cache_views`` trains from only the first N views of the cache; ``cache_scratch`` shares one decompressed copy
    of the cache between the students of a machine (:class:`~kdcache.feed.batches.DistillLoader`).
    ``hyper`` holds :class:`TrainConfig` fields. ``config.yaml`` holds every
    resolved setting: ``train-student --config`` with it repeats the run.
    Under ``torchrun`` each rank trains on its shard of the samples with
    DistributedDataParallel; ``batch_size`` stays the global batch and rank 0
    alone writes checkpoints and metrics.
    """
    given, cfg = _checked(read_values(TRAIN, {k: v for k, v in locals().items() if k not in NOT_SETTINGS}), hyper)
    ranks, dev = init_ranks(device)
    try:
        own_milestones = hyper.get("lr_milestones") is not None
        return _train(cfg, given, check_output_dir(out), resume, ranks, dev, progress and ranks.main, own_milestones)
    finally:
        ranks.close()


def _train(
    cfg: TrainConfig,
    given: dict[str, Any],
    out: Path,
    resume: bool,
    ranks: Ranks,
    dev: torch.device,
    progress: bool,
    own_milestones: bool,
) -> TrainResult:
    """Check the run folder and the caches, then hold the folder and train (:func:`_fit`). A resumed run keeps its
    LR milestones unless the command gives its own."""
    state = resume_state(out, resume, ranks)  # refused before anything is written into out
    if state is not None and not own_milestones:
        stored = stored_record(state).get("lr_milestones") or cfg.lr_milestones or ()
        cfg = dataclasses.replace(cfg, lr_milestones=tuple(stored))
    given["view_schedule"] = given["view_schedule"] or (stored_record(state)["view_schedule"] if state else "chunk")
    loader, test_ds = _build_loader(cfg, given, ranks, dev)
    try:
        record = _run_record(cfg, loader, given)
        if state is not None:
            check_resume(state.get("config", {}), record, cfg, out)
        settings = {**given, **dataclasses.asdict(cfg), "cache": loader.cache_locations or None}
        with run_lock(out, ranks):
            state = resume_state(out, resume, ranks)  # as it is now that this run holds the folder
            if state is not None:
                check_resume(state.get("config", {}), record, cfg, out)
            return _fit(cfg, loader, test_ds, out, state, record, settings, ranks, dev, progress)
    finally:
        loader.close()


def _checked(given: dict[str, object], hyper: dict[str, object]) -> tuple[dict[str, object], TrainConfig]:
    """A run's settings and resolved hyper-parameters, refused (before anything is loaded) when they cannot train."""
    plot = given["plot"]
    given["plot"] = None if plot in (None, False) else "" if plot is True else plot
    cfg = _config(given, hyper)
    if given["plot"]:
        check_output_dir(Path(str(given["plot"])).absolute().parent, "--plot folder")
    if cfg.spec.fn is not None and not given["cache"] and given["teacher"] is None:
        raise KdcacheError(
            f"--loss {cfg.loss} needs a teacher signal: pass --cache STORE or --teacher NAME --checkpoint PATH"
        )
    return given, cfg


def check_run(settings: Mapping[str, object], caches: bool = True) -> TrainConfig:
    """Everything :func:`train_student` checks before it writes, for ``settings`` (its keyword arguments) without
    training: every setting's rule, the loss and its options, the teacher signal and, with ``caches``, each cache
    against the dataset. A sweep checks every run of its SPEC this way before it starts one."""
    params = inspect.signature(train_student).parameters
    for name in ("student", "dataset"):
        if settings.get(name) is None:
            raise KdcacheError(f"missing option --{name}: every run needs one")
    defaults = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in NOT_SETTINGS}
    named = {k: v for k, v in settings.items() if k in defaults}
    hyper = {k: v for k, v in settings.items() if k not in defaults and k not in NOT_SETTINGS}
    given, cfg = _checked(read_values(TRAIN, {**defaults, **named, "out": None}), hyper)
    if caches and given["cache"]:
        g: dict[str, Any] = given
        open_caches(
            list(g["cache"]),
            build_dataset(g["dataset"], g["data_root"], "train", g["download"]),
            g["augment"],
            g["mix"],
        )
    return cfg


def _config(given: dict[str, Any], hyper: dict[str, object]) -> TrainConfig:
    """The run's resolved hyper-parameters, every setting checked against the settings table first."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(hyper) - fields)
    if unknown:
        raise KdcacheError(f"train_student takes no setting {unknown[0]!r}: see `kdcache train-student --help`")
    values: dict[str, Any] = read_values(TRAIN, hyper)  # mixed settings, checked by the table next
    check_options({**given, **values})
    loss_opt = parse_loss_opts(values.pop("loss_opt", None))
    cfg = TrainConfig(student=given["student"], loss=given["loss"], **values, loss_opt=loss_opt)
    cfg.validate()
    return cfg.resolved()


@contextlib.contextmanager
def _compile_errors(compiled: bool) -> Iterator[None]:
    """torch.compile's errors (raised at the first step, often a missing C++ compiler) as one line."""
    try:
        yield
    except Exception as exc:
        if compiled and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise KdcacheError(
                f"--compile failed ({type(exc).__name__}: {first}): install a C++ compiler (g++) and the Python "
                "headers torch.compile needs, or run without --compile"
            ) from None
        raise


def _build_loader(cfg: TrainConfig, given: dict, ranks: Ranks, dev: torch.device) -> tuple[DistillLoader, object]:
    """The training batches (cache or online teacher) and the test split."""
    g = given
    train_ds = build_dataset(g["dataset"], g["data_root"], "train", g["download"])
    test_ds = build_dataset(g["dataset"], g["data_root"], test_split(g["dataset"]), g["download"])
    check_dataset(train_ds)
    check_dataset(test_ds)
    online: Teacher | None = None
    if g["teacher"] is not None and not g["cache"] and cfg.spec.fn is not None:
        norm = train_ds.norm
        online = load_teacher(
            g["teacher"], train_ds.num_classes, norm, g["checkpoint"], g["weights"], str(dev), g["forward_block"]
        )
    # The loader's settings are train-student's of the same names; the run's own ones are passed explicitly.
    own = ("cache", "dataset", "data_root", "download", "device", "teacher", "batch_size", "seed", "kinds", "epochs")
    shared = {k: g[k] for k in inspect.signature(DistillLoader.__init__).parameters if k in g and k not in own}
    loader = DistillLoader(
        g["cache"],
        train_ds,
        **shared,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        kinds=cfg.spec.kinds,
        device=dev,
        teacher=online,
        with_teacher=cfg.spec.fn is not None,
        epochs=cfg.epochs,
        ranks=ranks,
    )
    try:
        _check_cache_teacher(loader, g["teacher"])
        check_signal(cfg, loader)
    except KdcacheError:
        loader.close()
        raise
    return loader, test_ds


def _check_cache_teacher(loader: DistillLoader, teacher: str | None) -> None:
    """With a cache, ``--teacher`` (as an mdistiller config's DISTILLER.TEACHER) must name the cache's teacher."""
    if teacher is None or loader.store is None:
        return
    held = loader.store.attr_dict("teacher").get("name")
    if held != teacher:
        raise KdcacheError(
            f"cache {loader.store.location} holds {held}'s logits, not {teacher}'s: drop --teacher or use a cache "
            f"of {teacher}"
        )


def _run_record(cfg: TrainConfig, loader: DistillLoader, given: dict) -> dict:
    """What a run is: the settings ``--resume`` must find unchanged (stored in ``last.pt``)."""
    caches = loader.cache_locations
    record = {
        **dataclasses.asdict(cfg),
        "dataset": given["dataset"],
        "cache": caches[0] if len(caches) == 1 else caches or None,
        "teacher": given["teacher"],
        "augment": loader.recipe.name,
        "num_views": loader.num_views,
        "view_seed": given["view_seed"],
        "view_schedule": loader.schedule,
    }
    if len(caches) > 1:
        record.update(teacher_weights=loader.weights, teacher_mix=loader.teacher_mix)
    if given["cache_views"] is not None:
        record["cache_views"] = given["cache_views"]
    if loader.recipe.mix != "none":
        record.update(mix=loader.recipe.mix, mix_alpha=loader.recipe.mix_alpha)
    return record


def _fit(
    cfg: TrainConfig,
    loader: DistillLoader,
    test_ds,
    out: Path,
    state: dict | None,
    record: dict,
    settings: dict,
    ranks: Ranks,
    dev: torch.device,
    progress: bool,
) -> TrainResult:
    """The epoch loop: LR step, one training epoch, evaluation, log and checkpoints."""
    model, net = build_student(cfg, loader.num_classes, dev, ranks)
    objective = build_objective(cfg, dev)
    params = list(model.parameters()) + list(objective.parameters())
    assert cfg.lr is not None, "_fit takes TrainConfig.resolved()"
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    precision = Precision(dev, cfg.amp, cfg.channels_last)
    scaler = precision.scaler()
    start, best = restore(state, model, objective, optimizer, scaler)
    log = RunLog(out, ranks.main, start - 1 if state is not None else None)
    history = log.history()
    if ranks.main:
        write_settings(settings, out / "config.yaml")
    note = loader.reuse_note(cfg.epochs)
    if note and ranks.main:
        warnings.warn(note, stacklevel=3)
    test_loader = eval_loader(test_ds, loader.recipe, loader.workers)
    for epoch in range(start, cfg.epochs + 1):
        lr = cfg.lr * cfg.lr_decay_rate ** sum(epoch > m for m in cfg.lr_milestones or ())
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        with _compile_errors(cfg.compile):
            stats = train_one_epoch(net, objective, optimizer, loader, epoch, precision, scaler, ranks, progress)
        # Rank 0's weights and BatchNorm statistics are the run's; it evaluates and tells the others.
        metrics = ranks.broadcast(
            evaluate(model, test_loader, test_ds.norm, dev, test_ds.num_classes, precision) if ranks.main else None
        )
        assert isinstance(metrics, dict)  # evaluate's, from rank 0
        row = {"epoch": epoch, "lr": lr, **stats, **metrics, "seconds": time.perf_counter() - t0}
        if objective.ctkd is not None:
            row["temperature"] = objective.temperature(epoch)
        history.append(row)
        improved, best = metrics["test_top1"] > best, max(best, metrics["test_top1"])
        if ranks.main:
            log.write(row)
            save_run(out, model, optimizer, objective, scaler, epoch, best, record, improved)
        ranks.barrier()
        if progress:
            say(_epoch_line(row, history, cfg.epochs))
    log.close()
    if settings["plot"] is not None and history and ranks.main:
        from kdcache.plots import plot_training

        plot_training({out.name: history}, Path(str(settings["plot"])) if settings["plot"] else out / "curves.png")
    return TrainResult(out, best, history[-1] if history else {}, history, ranks.main)


def _epoch_line(row: dict[str, float], history: list[dict[str, float]], epochs: int) -> str:
    """An epoch's line in the log: its numbers, and the run's ETA from the last three epochs."""
    recent = history[-3:]
    left = (epochs - int(row["epoch"])) * sum(h["seconds"] for h in recent) / len(recent)
    return (
        f"epoch {int(row['epoch']):>3}/{epochs}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
        f"top-1 {row['test_top1']:.2f}  nll {row['test_nll']:.3f}  ece {row['test_ece']:.3f}  "
        f"{row['seconds']:.1f}s  ETA {left:.0f}s"
    )


def load_student(path: str | Path, name: str, num_classes: int) -> torch.nn.Module:
    """A trained student (``best.pt`` / ``last.pt``), usable as a teacher later."""
    return load_checkpoint(create_model(name, num_classes), path)
