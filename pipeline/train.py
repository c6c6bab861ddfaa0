"""Stage two: train a student from cached teacher logits (or an online teacher, or CE alone).

Shaped like torchvision's ``references/classification``: the settings are
resolved once (:class:`TrainConfig`), the batches (:class:`~kdcache.batches.DistillLoader`)
and the objective (:class:`~kdcache.objective.Objective`) are built once, then
each epoch sets the LR, runs :func:`train_one_epoch` and :func:`evaluate`, logs
and saves. Epoch numbers are 1-based and the step LR counts milestones the
epoch is strictly past, as mdistiller does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache.batches import DistillLoader, eval_loader
from kdcache.data import build_dataset, test_split
from kdcache.errors import KdcacheError
from kdcache.feed import SCHEDULES
from kdcache.losses import CTKD_DECAYS, CTKDTemperature, LossSpec
from kdcache.models import create_model, load_checkpoint, save_checkpoint
from kdcache.objective import Objective, check_loss_opts, get_loss, parse_loss_opts
from kdcache.options import check_options
from kdcache.ranks import Ranks, init_ranks
from kdcache.runlog import METRICS_FILE, RunLog, read_records
from kdcache.store import check_output_dir, make_output_dir
from kdcache.teacher import Teacher, load_teacher
from kdcache.views import normalize

TEACHER_FIXES = ("none", "sort")
AMP_MODES = ("none", "bf16", "fp16")
SLOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
#: Per-loss options; a run's record compares only those its loss uses.
LOSS_OPTIONS = ("temperature", "alpha", "beta", "warmup", "gamma", "t_norm", "mlkd_variant")
_FALLBACK = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20, "gamma": 1.5, "t_norm": 2.0}


@dataclass
class TrainConfig:
    """Hyper-parameters of a student run; ``None`` means the published CIFAR-100 default for the loss."""

    student: str
    loss: str = "kd"
    loss_opt: dict[str, object] = field(default_factory=dict)
    logit_stand: bool = False
    temperature: float | None = None
    ce_weight: float | None = None
    kd_weight: float | None = None
    alpha: float | None = None
    beta: float | None = None
    warmup: int | None = None
    mlkd_variant: str = "reference"
    gamma: float | None = None
    t_norm: float | None = None
    teacher_fix: str = "none"
    ctkd: bool = False
    ctkd_t_start: float = 1.0
    ctkd_t_end: float = 20.0
    ctkd_decay: str = "cosine"
    ctkd_decay_epochs: int = 10
    ctkd_decay_max: float = 0.0
    ctkd_decay_min: float = -1.0
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None
    lr_milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay_rate: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False

    @property
    def spec(self) -> LossSpec:
        """The loss's registry entry (a user ``module:function`` is imported)."""
        return get_loss(self.loss)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the loss's published default (``kdcache losses`` lists them)."""
        spec = self.spec
        d = {"ce_weight": 1.0, "kd_weight": 0.0, **_FALLBACK, **spec.resolved_defaults(self.logit_stand)}
        d = {k: v for k, v in d.items() if k not in ("logit_stand", "mlkd_variant") and hasattr(self, k)}
        slow = self.student in SLOW_LR_STUDENTS
        d["lr"] = (0.01 if slow else 0.025) if spec.kinds == 2 else (0.01 if slow else 0.05)
        values = {k: (getattr(self, k) if getattr(self, k) is not None else d[k]) for k in d}
        loss_opt = {} if spec.builtin else {**{k: spec.defaults[k] for k in spec.options}, **self.loss_opt}
        return dataclasses.replace(self, **values, loss_opt=loss_opt, lr_milestones=tuple(self.lr_milestones))

    def validate(self) -> None:
        """Refuse nonsense settings with a one-line message naming the flag."""
        check_options({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        choices = [("mlkd-variant", ("reference", "paper")), ("teacher-fix", TEACHER_FIXES)]
        for name, allowed in [*choices, ("ctkd-decay", CTKD_DECAYS), ("amp", AMP_MODES)]:
            value = getattr(self, name.replace("-", "_"))
            if value not in allowed:
                raise KdcacheError(f"unknown --{name} {value!r}: choose one of {', '.join(allowed)}")
        spec = self.spec
        check_loss_opts(spec, self.loss_opt)
        if self.ctkd and not spec.ctkd:
            raise KdcacheError(f"--ctkd works with --loss kd or dkd (with or without --logit-stand), not {self.loss}")


@dataclass(frozen=True)
class Precision:
    """How the student computes: autocast dtype (``amp``) and memory format, on ``device``."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

    def autocast(self) -> AbstractContextManager:
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != "none")

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active for fp16 (whose small gradients would underflow)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    norm,
    device: torch.device,
    num_classes: int,
    precision: Precision | None = None,
) -> dict[str, float]:
    """Top-1, top-5, NLL and 15-bin ECE of ``model`` on ``loader``."""
    precision = precision or Precision(device)
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with precision.autocast():
            logits.append(model(precision.inputs(normalize(x.to(device), norm.mean, norm.std))).float().cpu())
        labels.append(y)
    z, y = torch.cat(logits), torch.cat(labels)
    return classification_metrics(z, y, num_classes)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, bins: int = 15
) -> dict[str, float]:
    """Accuracy (top-1, top-5), mean NLL and expected calibration error of a set of predictions."""
    prob = logits.softmax(dim=1)
    conf, pred = prob.max(dim=1)
    correct = (pred == labels).float()
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (conf[m].mean() - correct[m].mean()).abs()
    return {
        "test_top1": float(correct.mean() * 100),
        "test_top5": float(top5 * 100),
        "test_nll": float(F.cross_entropy(logits, labels)),
        "test_ece": float(ece),
    }


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
    if loader.format.is_topk and spec.fn is not None and (not spec.topk or cfg.teacher_fix != "none"):
        what = f"--teacher-fix {cfg.teacher_fix}" if spec.topk else f"--loss {cfg.loss}"
        raise KdcacheError(
            f"{what} needs every teacher logit, but {loader.store.location} is a {loader.format} cache: use --loss "
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
        net = torch.compile(net)
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


#: Settings a run folder made by an earlier kdcache does not record, with the values those runs used.
LEGACY_SETTINGS = {
    "view_schedule": "sample",
    "ctkd_decay": "cosine",
    "ctkd_decay_epochs": 10,
    "ctkd_decay_max": 0.0,
    "ctkd_decay_min": -1.0,
    "loss_opt": {},
    "lr_decay_rate": 0.1,
    "amp": "none",
    "channels_last": False,
    "compile": False,
}
#: train_student arguments that say where and how to report, not what to train (left out of config.yaml).
NOT_SETTINGS = ("out", "resume", "progress", "hyper")


def train_student(
    *,
    student: str,
    dataset: str,
    out: str | Path,
    loss: str = "kd",
    cache: str | list[str] | None = None,
    teacher_weights: str | list[float] | None = None,
    teacher_mix: str = "logits",
    cache_views: int | None = None,
    teacher: str | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
    augment: str | None = None,
    mix: str | None = None,
    mix_alpha: float = 1.0,
    views: str | int | None = None,
    view_seed: int = 0,
    forward_block: int = 64,
    data_root: str | None = None,
    download: bool = False,
    workers: int = 0,
    device: str = "auto",
    resume: bool = False,
    verify_views: bool = False,
    plot: bool = False,
    progress: bool = True,
    cache_memory: int = 4 << 30,
    cache_scratch: str | None = None,
    view_schedule: str | None = None,
    **hyper,
) -> TrainResult:
    """Train ``student`` and write ``config.yaml``, ``metrics.jsonl``, ``last.pt`` and ``best.pt`` into ``out``.

    Teacher signal comes from ``cache`` (a dump-logits store, or a list of
    stores of the same views from several teachers, combined per
    ``teacher_mix`` with ``teacher_weights``), or from an online ``teacher``
    run on the same views (``augment``, ``mix``, ``mix_alpha``, ``views``,
    ``view_seed``; ``weights`` names torchvision weights); ``loss="ce"`` needs
    neither. With ``cache``, ``teacher`` only checks which teacher the cache holds.
    ``view_schedule`` picks how a seeded cache's views are drawn per epoch
    (:func:`kdcache.feed.epoch_views`; ``chunk`` for a new run, the run's own on ``resume``).
    ``cache_views`` trains from only the first N views of the cache; ``cache_scratch`` shares one decompressed copy
    of the cache between the students of a machine (:class:`~kdcache.batches.DistillLoader`).
    ``hyper`` holds :class:`TrainConfig` fields. ``config.yaml`` holds every
    resolved setting: ``train-student --config`` with it repeats the run.
    Under ``torchrun`` each rank trains on its shard of the samples with
    DistributedDataParallel; ``batch_size`` stays the global batch and rank 0
    alone writes checkpoints and metrics.
    """
    given = {k: v for k, v in locals().items() if k not in NOT_SETTINGS}
    check_options(given)
    cfg = TrainConfig(student=student, loss=loss, **{**hyper, "loss_opt": parse_loss_opts(hyper.get("loss_opt"))})
    cfg.validate()
    if view_schedule not in (None, *SCHEDULES):
        raise KdcacheError(f"unknown --view-schedule {view_schedule!r}: choose one of {', '.join(SCHEDULES)}")
    cfg = cfg.resolved()
    if cfg.spec.fn is not None and not cache and teacher is None:
        raise KdcacheError(
            f"--loss {cfg.loss} needs a teacher signal: pass --cache STORE or --teacher NAME --checkpoint PATH"
        )
    ranks, dev = init_ranks(device)
    out = check_output_dir(out)
    with _run_lock(out, ranks):
        state = _resume_state(out, resume, ranks)
        given["view_schedule"] = view_schedule or (_stored(state)["view_schedule"] if state else "chunk")
        loader, test_ds = _build_loader(cfg, given, ranks, dev)
        record = _run_record(cfg, loader, given)
        settings = {**given, **dataclasses.asdict(cfg), "cache": loader.cache_locations or None}
        try:
            if state is not None:
                _check_resume(state.get("config", {}), record, cfg, out)
            return _fit(cfg, loader, test_ds, out, state, record, settings, ranks, dev, progress and ranks.main)
        finally:
            loader.close()
            ranks.close()


def _build_loader(cfg: TrainConfig, given: dict, ranks: Ranks, dev: torch.device) -> tuple[DistillLoader, object]:
    """The training batches (cache or online teacher) and the test split."""
    g = given
    train_ds = build_dataset(g["dataset"], g["data_root"], "train", g["download"])
    test_ds = build_dataset(g["dataset"], g["data_root"], test_split(g["dataset"]), g["download"])
    online: Teacher | None = None
    if g["teacher"] is not None and not g["cache"] and cfg.spec.fn is not None:
        norm = train_ds.norm
        online = load_teacher(
            g["teacher"], train_ds.num_classes, norm, g["checkpoint"], g["weights"], str(dev), g["forward_block"]
        )
    loader = DistillLoader(
        g["cache"],
        train_ds,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        kinds=cfg.spec.kinds,
        device=dev,
        workers=g["workers"],
        verify_views=g["verify_views"],
        view_schedule=g["view_schedule"],
        cache_views=g["cache_views"],
        cache_memory=g["cache_memory"],
        cache_scratch=g["cache_scratch"],
        teacher_weights=g["teacher_weights"],
        teacher_mix=g["teacher_mix"],
        teacher=online,
        augment=g["augment"],
        mix=g["mix"],
        mix_alpha=g["mix_alpha"],
        views=g["views"],
        view_seed=g["view_seed"],
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
    held = loader.store.attrs["teacher"].get("name")
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
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    precision = Precision(dev, cfg.amp, cfg.channels_last)
    scaler = precision.scaler()
    start, best = _restore(state, model, objective, optimizer, scaler)
    log = RunLog(out, ranks.main, start - 1 if state is not None else None)
    history = log.history()
    if ranks.main:
        from kdcache.configs import dump_config

        dump_config(settings, out / "config.yaml")
    note = loader.reuse_note(cfg.epochs)
    if note and ranks.main:
        warnings.warn(note, stacklevel=3)
    test_loader = eval_loader(test_ds, loader.recipe, loader.workers)
    for epoch in range(start, cfg.epochs + 1):
        lr = cfg.lr * cfg.lr_decay_rate ** sum(epoch > m for m in cfg.lr_milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        stats = train_one_epoch(net, objective, optimizer, loader, epoch, precision, scaler, ranks, progress)
        # Rank 0's weights and BatchNorm statistics are the run's; it evaluates and tells the others.
        metrics = ranks.broadcast(
            evaluate(model, test_loader, test_ds.norm, dev, test_ds.num_classes, precision) if ranks.main else None
        )
        row = {"epoch": epoch, "lr": lr, **stats, **metrics, "seconds": time.perf_counter() - t0}
        if objective.ctkd is not None:
            row["temperature"] = objective.temperature(epoch)
        history.append(row)
        improved, best = metrics["test_top1"] > best, max(best, metrics["test_top1"])
        if ranks.main:
            log.write(row)
            _save(out, model, optimizer, objective, scaler, epoch, best, record, improved)
        ranks.barrier()
        if progress:
            tqdm.write(
                f"epoch {epoch:>3}  lr {lr:.4g}  loss {row['train_loss']:.4f}  top-1 {metrics['test_top1']:.2f}  "
                f"nll {metrics['test_nll']:.3f}  ece {metrics['test_ece']:.3f}  {row['seconds']:.1f}s"
            )
    log.close()
    if settings["plot"] and history and ranks.main:
        from kdcache.plots import plot_training

        plot_training({out.name: history}, out / "curves.png")
    return TrainResult(out, best, history[-1] if history else {}, history, ranks.main)


@contextlib.contextmanager
def _run_lock(out: Path, ranks: Ranks) -> Iterator[None]:
    """Hold ``out`` for this run (rank 0 creates it and takes ``out/.lock``): a second run into it is refused."""
    if not ranks.main:
        yield
        return
    make_output_dir(out)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KdcacheError(f"{out} is in use by another running student: wait for it or choose another --out") from None
    try:
        yield
    finally:
        os.close(fd)


def _resume_state(out: Path, resume: bool, ranks: Ranks) -> dict | None:
    """The checkpoint to continue (``--resume`` of a run that saved one), refusing to start over a saved run."""
    ranks.barrier()  # every rank checks the output folder before rank 0 writes to it
    last = out / "last.pt"
    if not last.exists():
        return None
    if not resume:
        raise KdcacheError(f"{out} already holds a run (last.pt): pass --resume to continue it or choose another --out")
    return torch.load(last, map_location="cpu", weights_only=True)


def _stored(state: dict) -> dict:
    """A checkpoint's run record, with the values of settings older runs did not record."""
    return {**LEGACY_SETTINGS, **state.get("config", {})}


def _restore(
    state: dict | None,
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[int, float]:
    """Load a resumed run's weights and optimizer; the first epoch to train and the best top-1 so far."""
    if state is None:
        return 1, -1.0
    model.load_state_dict(state["model"])
    if objective.ctkd is not None:
        objective.ctkd.load_state_dict(state["ctkd"])
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, float(state["best_top1"])


def _save(
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    scaler: torch.amp.GradScaler,
    epoch: int,
    best: float,
    record: dict,
    improved: bool,
) -> None:
    """``best.pt`` when the epoch improved top-1, and ``last.pt`` (all a resume needs) every epoch."""
    if improved:
        save_checkpoint(out / "best.pt", model, epoch=epoch, test_top1=best)
    extra = {"ctkd": objective.ctkd.state_dict()} if objective.ctkd is not None else {}
    if scaler.is_enabled():
        extra["scaler"] = scaler.state_dict()
    save_checkpoint(
        out / "last.pt", model, optimizer=optimizer.state_dict(), epoch=epoch, best_top1=best, config=record, **extra
    )


def _check_resume(stored: dict, record: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse ``--resume`` when a setting differs from the run in ``out``, naming it with both values.

    A run started before a setting was recorded resumes with the value it was started with
    (:data:`LEGACY_SETTINGS`); options the run's loss does not use are not compared.
    """
    if cfg.ctkd and "ctkd_decay" not in stored:
        raise KdcacheError(
            f"the CTKD run in {out} was started before CTKD's lambda schedule moved one epoch earlier (as upstream): "
            "it cannot resume on the new schedule; start it again in a new --out"
        )
    stored = {**LEGACY_SETTINGS, **stored, "epochs": cfg.epochs}
    spec = cfg.spec
    unused = set(LOSS_OPTIONS) - set(spec.options) - ({"warmup"} if spec.warmup else set())
    keys = sorted((stored.keys() | record.keys()) - unused)
    diff = [k for k in keys if stored.get(k) != record.get(k)]
    if diff:
        what = "; ".join(f"{k}: run has {stored.get(k)!r}, this command {record.get(k)!r}" for k in diff)
        raise KdcacheError(f"--resume with different settings than the run in {out} ({what}): use the original command")


def finished_run(run_dir: str | Path, epochs: int) -> list[dict] | None:
    """The metrics history of a run folder that already trained ``epochs`` epochs, else None (not started or cut
    off)."""
    rows = read_records(Path(run_dir) / METRICS_FILE)
    return rows if rows and rows[-1]["epoch"] >= epochs else None


def load_student(path: str | Path, name: str, num_classes: int) -> torch.nn.Module:
    """A trained student (``best.pt`` / ``last.pt``), usable as a teacher later."""
    return load_checkpoint(create_model(name, num_classes), path)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "Precision",
    "train_student",
    "train_one_epoch",
    "evaluate",
    "build_objective",
    "build_student",
    "classification_metrics",
    "load_student",
    "finished_run",
]
