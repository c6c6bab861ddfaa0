"""Stage two: train a student from cached teacher logits (or an online teacher, or CE alone).

The loop follows torchvision's ``references/classification`` shape: build data,
model, optimizer; per epoch set the LR, train one epoch, evaluate, log, save.
Epoch numbers are 1-based and the step LR counts milestones the epoch is
strictly past, as mdistiller does.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache.data import ImageDataset, build_dataset, test_split
from kdcache.errors import KdcacheError
from kdcache.feed import SCHEDULES, LogitFeed, epoch_order, epoch_views, reuse_warning
from kdcache.losses import (
    CTKD_DECAYS,
    TEACHER_MIXES,
    CTKDTemperature,
    dkd_loss,
    ensemble_teachers,
    kd_loss,
    mlkd_loss,
    nkd_loss,
    normkd_dkd_loss,
    normkd_loss,
    sort_teacher,
    topk_dkd_loss,
    topk_kd_loss,
    zscore,
)
from kdcache.models import create_model, load_checkpoint, save_checkpoint
from kdcache.ranks import init_ranks
from kdcache.store import CacheStore, array_names, check_output_dir, open_store, view_mismatch
from kdcache.teacher import Teacher, load_teacher
from kdcache.topk import LogitFormat, TopKTeacher
from kdcache.views import Recipe, make_recipe, normalize, parse_views, pixel_hash, recipe_from_attrs

LOSSES = ("ce", "kd", "dkd", "mlkd", "nkd", "normkd", "normkd-dkd")
CTKD_LOSSES = ("kd", "dkd")
TEACHER_FIXES = ("none", "sort")
SLOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
HASH_CHECK_EVERY = 16  # verify pixel hashes on every 16th batch (and the first) unless --verify-views


@dataclass
class TrainConfig:
    """Hyper-parameters of a student run; ``None`` means the published CIFAR-100 default for the loss."""

    student: str
    loss: str = "kd"
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
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the loss's published default (see the README table)."""
        ls = self.logit_stand
        d: dict[str, float] = {
            "ce_weight": 1.0,
            "kd_weight": 0.0,
            "temperature": 4.0,
            "alpha": 1.0,
            "beta": 8.0,
            "warmup": 20,
            "gamma": 1.5,
            "t_norm": 2.0,
        }
        if self.loss in ("kd", "mlkd", "normkd"):
            d.update(ce_weight=0.1, kd_weight=9.0 if ls else 0.9, temperature=2.0 if ls else 4.0)
        elif self.loss in ("dkd", "normkd-dkd"):
            d.update(ce_weight=1.0, kd_weight=9.0 if ls else 1.0, temperature=2.0 if ls else 4.0)
        elif self.loss == "nkd":
            d.update(ce_weight=1.0, kd_weight=1.0, temperature=1.0)
        slow = self.student in SLOW_LR_STUDENTS
        d["lr"] = (0.01 if slow else 0.025) if self.loss == "mlkd" else (0.01 if slow else 0.05)
        values = {k: (getattr(self, k) if getattr(self, k) is not None else d[k]) for k in d}
        return dataclasses.replace(self, **values)

    def validate(self) -> None:
        """Refuse nonsense numbers with a one-line message."""
        if self.loss not in LOSSES:
            raise KdcacheError(f"unknown --loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        positive, at_least_0, at_least_1 = "must be positive", "must be 0 or more", "must be at least 1"
        checks = [
            ("epochs", self.epochs >= 1, at_least_1),
            ("batch-size", self.batch_size >= 1, at_least_1),
            ("lr", self.lr is None or self.lr > 0, positive),
            ("temperature", self.temperature is None or self.temperature > 0, positive),
            ("ce-weight", self.ce_weight is None or self.ce_weight >= 0, at_least_0),
            ("kd-weight", self.kd_weight is None or self.kd_weight >= 0, at_least_0),
            ("t-norm", self.t_norm is None or self.t_norm > 0, positive),
            ("weight-decay", self.weight_decay >= 0, at_least_0),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("warmup", self.warmup is None or self.warmup >= 0, at_least_0),
            ("seed", 0 <= self.seed < 2**64, "must be in 0 .. 2**64 - 1"),
            ("ctkd-decay-epochs", self.ctkd_decay_epochs >= 1, at_least_1),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise KdcacheError(f"--{name} {rule}, got {getattr(self, name.replace('-', '_'))}")
        if self.mlkd_variant not in ("reference", "paper"):
            raise KdcacheError(f"unknown --mlkd-variant {self.mlkd_variant!r}: choose reference or paper")
        if self.teacher_fix not in TEACHER_FIXES:
            raise KdcacheError(f"unknown --teacher-fix {self.teacher_fix!r}: choose one of {', '.join(TEACHER_FIXES)}")
        if self.ctkd_decay not in CTKD_DECAYS:
            raise KdcacheError(f"unknown --ctkd-decay {self.ctkd_decay!r}: choose one of {', '.join(CTKD_DECAYS)}")
        if self.ctkd and self.loss not in CTKD_LOSSES:
            raise KdcacheError(f"--ctkd works with --loss kd or dkd (with or without --logit-stand), not {self.loss}")


class StudentViews(Dataset):
    """Training views for one epoch: rebuilt from stored parameters (cache) or sampled from the recipe (online)."""

    def __init__(self, dataset: ImageDataset, recipe: Recipe, kinds: int):
        self.dataset, self.recipe, self.kinds = dataset, recipe, kinds
        self.params: list[np.ndarray] | None = None
        self.views: np.ndarray | None = None
        self.view_seed, self.all_views, self.offset = 0, False, 0
        self.check = np.zeros(len(dataset), dtype=bool)

    def set_epoch(
        self,
        views: np.ndarray,
        check: np.ndarray,
        params: list[np.ndarray] | None = None,
        view_seed: int = 0,
        all_views: bool = False,
        offset: int = 0,
    ) -> None:
        """The epoch's view per sample; stored ``params`` (row ``i - offset`` for sample ``i``) or online sampling."""
        self.views, self.check, self.params, self.view_seed, self.all_views = views, check, params, view_seed, all_views
        self.offset = offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        img = self.dataset.image(i)
        pixels, hashes = [], []
        mix = np.asarray([i, 1.0])  # (partner, λ) of the weak view: itself with weight 1 unless mixed
        for k in range(self.kinds):
            partner = partner_img = None
            if self.params is not None:
                p = self.params[k][i - self.offset]
                partner = self.recipe.partner_of(p) if k == 0 else None
                partner_img = self.dataset.image(partner) if partner is not None else None
            elif self.recipe.mix != "none" and k == 0:
                v = np.asarray([self.views[i]])
                partner = int(self.recipe.partners(self.view_seed, v, np.asarray([i]), len(self.dataset))[0])
                partner_img = self.dataset.image(partner)
                p = self.recipe.params_batch(
                    self.view_seed,
                    v,
                    np.asarray([i]),
                    k,
                    np.asarray([img.shape[:2]]),
                    self.all_views,
                    np.asarray([partner]),
                    np.asarray([partner_img.shape[:2]]),
                )[0]
            else:
                p = self.recipe.params(self.view_seed, int(self.views[i]), i, k, img.shape[:2], self.all_views)
            if partner is not None:
                mix = np.asarray(self.recipe.mixing(p[None]), dtype=np.float64)[:, 0]
            x = self.recipe.apply(img, p, k, partner_img)
            pixels.append(x)
            hashes.append(np.uint64(pixel_hash(x)).view(np.int64) if self.check[i] else np.int64(0))
        return i, int(self.dataset.labels[i]), pixels, hashes, mix


class EvalViews(Dataset):
    """The deterministic evaluation view of every test image."""

    def __init__(self, dataset: ImageDataset, recipe: Recipe):
        self.dataset, self.recipe = dataset, recipe

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return self.recipe.eval_view(self.dataset.image(i)), int(self.dataset.labels[i])


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, loader: DataLoader, norm, device: torch.device, num_classes: int
) -> dict[str, float]:
    """Top-1, top-5, NLL and 15-bin ECE of ``model`` on ``loader``."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(normalize(x.to(device), norm.mean, norm.std)).float().cpu())
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


def _warm(cfg: TrainConfig, epoch: int) -> float:
    """DKD's warm-up factor ``min(epoch / warmup, 1)`` for the 1-based epoch (1 with no warm-up)."""
    return min(epoch / cfg.warmup, 1.0) if cfg.warmup else 1.0


def _distill(
    cfg: TrainConfig,
    epoch: int,
    y: torch.Tensor,
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    temperature: float | torch.Tensor,
    mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    if mixed is None:
        ce = F.cross_entropy(student[0], y)
    else:  # a mixed view's label is the λ-weighted pair (sample, partner)
        y2, lam = mixed
        ce = (
            lam * F.cross_entropy(student[0], y, reduction="none")
            + (1 - lam) * F.cross_entropy(student[0], y2, reduction="none")
        ).mean()
    if cfg.loss == "ce":
        return cfg.ce_weight * ce
    if cfg.teacher_fix == "sort":
        teacher = [sort_teacher(t, y) for t in teacher]
    s, t = student[0], teacher[0]
    if isinstance(t, TopKTeacher):
        if cfg.loss == "kd":
            return cfg.ce_weight * ce + cfg.kd_weight * topk_kd_loss(s, t, y, temperature, cfg.logit_stand)
        return cfg.ce_weight * ce + _warm(cfg, epoch) * cfg.kd_weight * topk_dkd_loss(
            s, t, y, cfg.alpha, cfg.beta, temperature, cfg.logit_stand
        )
    if cfg.loss == "kd":
        return cfg.ce_weight * ce + cfg.kd_weight * kd_loss(s, t, temperature, cfg.logit_stand)
    if cfg.loss == "dkd":
        return cfg.ce_weight * ce + _warm(cfg, epoch) * cfg.kd_weight * dkd_loss(
            s, t, y, cfg.alpha, cfg.beta, temperature, cfg.logit_stand
        )
    if cfg.loss in ("nkd", "normkd", "normkd-dkd"):
        if cfg.logit_stand:
            s, t = zscore(s), zscore(t)
        if cfg.loss == "normkd-dkd":
            term = _warm(cfg, epoch) * normkd_dkd_loss(s, t, y, cfg.alpha, cfg.beta, cfg.t_norm)
        else:
            term = nkd_loss(s, t, y, temperature, cfg.gamma) if cfg.loss == "nkd" else normkd_loss(s, t, cfg.t_norm)
        return cfg.ce_weight * ce + cfg.kd_weight * term
    ce = ce + F.cross_entropy(student[1], y)
    return cfg.ce_weight * ce + cfg.kd_weight * mlkd_loss(
        student[0], student[1], teacher[0], teacher[1], temperature, cfg.logit_stand, cfg.mlkd_variant
    )


def _cache_matches(store: CacheStore, ds: ImageDataset, augment: str | None, mix: str | None = None) -> Recipe:
    """Fail closed: the cache must be complete and made from this dataset, split and recipe."""
    if not store.complete():
        missing = int((~store.done()).sum())
        raise KdcacheError(
            f"cache {store.location} is incomplete ({missing} chunks missing): re-run its dump-logits command to "
            "finish it"
        )
    names = array_names(store.num_kinds, store.format)
    hole = store.missing_chunk([a for kind in names["teacher"] for a in kind] + names["view_hash"])
    if hole is not None:
        name, v, c = hole
        where = f"array {name}, view {v}, chunk {c}" if v >= 0 else f"array {name} (a chunk)"
        raise KdcacheError(
            f"cache {store.location}: {where} has no data although marked done (a file was lost): restore the store "
            "or dump it again into a new --out; `kdcache verify` lists every problem"
        )
    fp = ds.fingerprint()
    stored = store.attrs["dataset"]
    for key in ("name", "split", "length", "num_classes", "labels_sha256", "images_sha256", "files_sha256"):
        if stored.get(key) != fp.get(key):
            raise KdcacheError(
                f"cache {store.location} was made for other data: dataset {key} is {stored.get(key)!r} there, "
                f"{fp.get(key)!r} here; pass the matching --dataset/--data-root or dump a new cache"
            )
    recipe = recipe_from_attrs(store.attrs["recipe"])
    if augment is not None and augment != recipe.name:
        raise KdcacheError(
            f"cache {store.location} holds --augment {recipe.name} views, not {augment}: drop --augment or use "
            "another cache"
        )
    if mix is not None and mix != recipe.mix:
        raise KdcacheError(
            f"cache {store.location} holds --mix {recipe.mix} views, not {mix}: drop --mix or use another cache"
        )
    return recipe


def _open_caches(
    caches: list[str],
    ds: ImageDataset,
    augment: str | None,
    mix: str | None,
    teacher_weights: str | list[float] | None,
    teacher_mix: str,
) -> tuple[list[CacheStore], Recipe, list[float]]:
    """Open every ``--cache``, check each against the data, and check they hold the same views; returns the mixing
    weights."""
    stores = [open_store(c) for c in caches]
    recipe = [_cache_matches(st, ds, augment, mix) for st in stores][0]
    if teacher_mix not in TEACHER_MIXES:
        raise KdcacheError(f"unknown --teacher-mix {teacher_mix!r}: choose logits or probs")
    if teacher_weights is None:
        weights = [1.0] * len(stores)
    elif isinstance(teacher_weights, str):
        try:
            weights = [float(w) for w in teacher_weights.split(",")]
        except ValueError:
            raise KdcacheError(
                f"--teacher-weights takes one number per --cache, such as 0.5,0.5, not {teacher_weights!r} "
                "(an online teacher's torchvision weights name goes to --weights)"
            ) from None
    else:
        weights = [float(w) for w in teacher_weights]
    if len(weights) != len(stores) or min(weights) < 0 or sum(weights) <= 0:
        raise KdcacheError(
            f"--teacher-weights needs {len(stores)} non-negative numbers (one per --cache) with a positive sum, "
            f"got {teacher_weights!r}"
        )
    for other in stores[1:]:
        if stores[0].format.is_topk or other.format.is_topk:
            raise KdcacheError("several teachers need full-logit caches (--format full), not top-K ones")
        diff = view_mismatch(stores[0], other)
        if diff:
            raise KdcacheError(
                f"caches {stores[0].location} and {other.location} do not hold the same views: {diff}; "
                "dump every teacher with the same --dataset, --augment, --views and --seed"
            )
    return stores, recipe, [w / sum(weights) for w in weights]


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
    view_schedule: str | None = None,
    **hyper,
) -> TrainResult:
    """Train ``student`` and write ``metrics.jsonl``, ``last.pt`` and ``best.pt`` into ``out``.

    Teacher signal comes from ``cache`` (a dump-logits store, or a list of
    stores of the same views from several teachers, combined per
    ``teacher_mix`` with ``teacher_weights``: see :func:`ensemble_teachers`), or
    from an online ``teacher`` run on the same views (``augment``, ``mix``,
    ``mix_alpha``, ``views``, ``view_seed``; ``weights`` names torchvision
    weights); ``loss="ce"`` needs neither.
    ``view_schedule`` picks how a seeded cache's views are drawn per epoch
    (:func:`kdcache.feed.epoch_views`; ``chunk`` for a new run, the run's own on ``resume``).
    ``cache_views`` trains from only the first N views of the cache (see :func:`kdcache.study.study_views`).
    ``hyper`` holds :class:`TrainConfig` fields.
    Under ``torchrun`` each rank trains on its shard of the samples with
    DistributedDataParallel; ``batch_size`` stays the global batch and rank 0
    alone writes checkpoints and metrics.
    """
    cfg = TrainConfig(student=student, loss=loss, **hyper)
    cfg.validate()
    if view_schedule not in (None, *SCHEDULES):
        raise KdcacheError(f"unknown --view-schedule {view_schedule!r}: choose one of {', '.join(SCHEDULES)}")
    cfg = cfg.resolved()
    caches = [] if cache is None else [str(cache)] if isinstance(cache, (str, Path)) else [str(c) for c in cache]
    if cfg.loss != "ce" and not caches and teacher is None:
        raise KdcacheError(
            f"--loss {cfg.loss} needs a teacher signal: pass --cache STORE or --teacher NAME --checkpoint PATH"
        )
    if teacher_weights is not None and len(caches) < 2:
        raise KdcacheError("--teacher-weights mixes several teachers: pass one --cache per teacher (two or more)")
    if caches and teacher is not None:
        raise KdcacheError("pass either --cache or --teacher, not both")
    ranks, dev = init_ranks(device)
    if cfg.batch_size % ranks.world:
        raise KdcacheError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide among {ranks.world} processes: "
            f"use a multiple of {ranks.world}"
        )
    progress = progress and ranks.main
    train_ds = build_dataset(dataset, data_root, "train", download)
    test_ds = build_dataset(dataset, data_root, test_split(dataset), download)

    stores, mix_weights = [], [1.0]
    if caches:
        stores, recipe, mix_weights = _open_caches(caches, train_ds, augment, mix, teacher_weights, teacher_mix)
    store = stores[0] if stores else None
    if store is not None:
        num_views = store.num_views
        uniform = store.attrs["views_mode"] == "all"
        if cache_views is not None:
            if uniform:
                raise KdcacheError(
                    f"{caches[0]} enumerates all views in a fixed order, so its first views are not a random "
                    "sample: use a cache of seeded views (--views N)"
                )
            if not 1 <= cache_views <= num_views:
                raise KdcacheError(
                    f"--cache-views {cache_views} is out of range: the cache holds {num_views} views per sample"
                )
            num_views = cache_views
    else:
        recipe = make_recipe(
            augment or ("cifar" if train_ds.small else "imagenet"), train_ds.small, mix or "none", mix_alpha
        )
        num_views, mode = parse_views(
            views if views is not None else ("all" if recipe.num_discrete_views else cfg.epochs), recipe
        )
        uniform = mode == "all"
    kinds = 2 if cfg.loss == "mlkd" else 1
    if kinds > len(recipe.kinds):
        raise KdcacheError(
            "--loss mlkd needs weak and strong views: use a cache dumped with --augment mlkd (or --augment mlkd online)"
        )
    online: Teacher | None = None
    if teacher is not None and cfg.loss != "ce":
        online = load_teacher(
            teacher, train_ds.num_classes, train_ds.norm, checkpoint, weights, str(dev), forward_block
        )
    if (
        store is not None
        and store.format.is_topk
        and cfg.loss != "ce"
        and (cfg.loss not in ("kd", "dkd") or cfg.teacher_fix != "none")
    ):
        what = f"--teacher-fix {cfg.teacher_fix}" if cfg.loss in ("kd", "dkd") else f"--loss {cfg.loss}"
        raise KdcacheError(
            f"{what} needs every teacher logit, but {caches[0]} is a {store.format} cache: use --loss kd or dkd "
            "with it, "
            "or dump with --format full"
        )
    if recipe.mix != "none" and (cfg.loss not in ("ce", "kd") or cfg.teacher_fix != "none"):
        raise KdcacheError(
            f"{recipe.mix} views have two target classes, so --loss {cfg.loss}"
            f"{' --teacher-fix ' + cfg.teacher_fix if cfg.teacher_fix != 'none' else ''} is undefined on them: "
            "use --loss kd (or ce), or views without --mix"
        )
    if store is not None and store.num_classes != train_ds.num_classes:
        raise KdcacheError(
            f"cache has {store.num_classes} classes but {dataset} has {train_ds.num_classes}: use a cache of this "
            "dataset"
        )

    out = check_output_dir(out)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    config_record = {
        **dataclasses.asdict(cfg),
        "dataset": dataset,
        "cache": caches[0] if len(caches) == 1 else caches or None,
        "teacher": teacher,
        "augment": recipe.name,
        "num_views": num_views,
        "view_seed": view_seed,
        "view_schedule": view_schedule or "chunk",
    }
    if len(caches) > 1:
        config_record.update(teacher_weights=mix_weights, teacher_mix=teacher_mix)
    if cache_views is not None:
        config_record["cache_views"] = cache_views
    if recipe.mix != "none":
        config_record.update(mix=recipe.mix, mix_alpha=recipe.mix_alpha)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.student, train_ds.num_classes).to(dev)
    net = model
    if ranks.world > 1:
        # static_graph: MLKD runs the student twice (weak, strong) before one backward.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, static_graph=True
        )
    ctkd = None
    if cfg.ctkd:
        ctkd = CTKDTemperature(
            cfg.ctkd_t_start,
            cfg.ctkd_t_end,
            curriculum=cfg.ctkd_decay_epochs,
            decay=cfg.ctkd_decay,
            decay_max=cfg.ctkd_decay_max,
            decay_min=cfg.ctkd_decay_min,
        ).to(dev)
    params = list(model.parameters()) + (list(ctkd.parameters()) if ctkd is not None else [])
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start_epoch, best, history = 1, -1.0, []
    last_path, metrics_path = out / "last.pt", out / "metrics.jsonl"
    ranks.barrier()  # every rank checks the output folder before rank 0 writes to it
    if last_path.exists() and not resume:
        raise KdcacheError(f"{out} already holds a run (last.pt): pass --resume to continue it or choose another --out")
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        config_record["view_schedule"] = _check_resume(
            state.get("config", {}), config_record, cfg, out, view_schedule is None
        )
        model.load_state_dict(state["model"])
        if ctkd is not None:
            ctkd.load_state_dict(state["ctkd"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best_top1"])
        history = (
            [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            if metrics_path.exists()
            else []
        )
        history = [h for h in history if h["epoch"] < start_epoch]
        if ranks.main:
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    elif metrics_path.exists() and ranks.main:
        metrics_path.unlink()

    note = reuse_warning(cfg.epochs, num_views, uniform) if (store is not None or online is not None) else None
    if note and ranks.main:
        warnings.warn(note, stacklevel=2)
    names = array_names(len(recipe.kinds), store.format if store is not None else LogitFormat())
    feed_arrays = []
    if store is not None:
        feed_arrays = [a for k in range(kinds) for a in (names["params"][k], names["view_hash"][k]) if a in store.group]
        if cfg.loss != "ce":
            feed_arrays += [a for k in range(kinds) for a in names["teacher"][k]]
    n = len(train_ds)
    lo, hi = ranks.shard(n)
    feeds = [
        LogitFeed(
            st,
            feed_arrays if j == 0 else [a for a in feed_arrays if a.startswith("logits")],
            cache_memory,
            rows=(lo, hi),
        )
        for j, st in enumerate(stores)
    ]
    train_views = StudentViews(train_ds, recipe, kinds)
    test_loader = DataLoader(EvalViews(test_ds, recipe), batch_size=256, num_workers=workers)
    batch = cfg.batch_size // ranks.world

    def epoch_views_of(epoch: int) -> np.ndarray:
        return epoch_views(cfg.seed, epoch - 1, n, num_views, uniform, config_record["view_schedule"])

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        # This rank's shard in the epoch's order, padded with its own first samples to the common length.
        order = lo + epoch_order(cfg.seed, epoch - 1, hi - lo)
        order = np.concatenate([order, order[: ranks.steps_size(n) - len(order)]])
        return [order[s : s + batch] for s in range(0, len(order), batch)]

    for epoch in range(start_epoch, cfg.epochs + 1):
        lr = cfg.lr * 0.1 ** sum(epoch > m for m in cfg.lr_milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views_e = epoch_views_of(epoch)
        batches = epoch_batches(epoch)
        check = np.zeros(n, dtype=bool)
        for b, idx in enumerate(batches):
            if verify_views or b % HASH_CHECK_EVERY == 0:
                check[idx] = True
        rows = None
        if feeds:
            every = [f.get(epoch, views_e[lo:hi]) for f in feeds]
            rows = every[0]
            if epoch < cfg.epochs:
                for f in feeds:
                    f.prefetch(epoch + 1, epoch_views_of(epoch + 1)[lo:hi])
            params = [
                rows[names["params"][k]] if names["params"][k] in rows else np.zeros((hi - lo, 0), np.float32)
                for k in range(kinds)
            ]
            train_views.set_epoch(views_e, check, params, offset=lo)
        else:
            train_views.set_epoch(views_e, check, None, view_seed, uniform)
        loader = DataLoader(train_views, batch_sampler=batches, num_workers=workers)
        net.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(
            loader,
            total=len(batches),
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="batch",
            disable=None if progress else True,
            dynamic_ncols=True,
            leave=False,
        )
        for idx, y, pixels, hashes, mix in bar:
            if rows is not None:
                _verify_hashes(rows, names, idx, hashes, views_e, kinds, lo)
            x = [normalize(p.to(dev, non_blocking=True), train_ds.norm.mean, train_ds.norm.std) for p in pixels]
            y = y.to(dev)
            s_logits = [net(xk) for xk in x]
            if cfg.loss == "ce":
                t_logits = []
            elif online is not None:
                t_logits = [online(p).to(dev) for p in pixels]
            else:
                at = idx.numpy() - lo
                if len(every) > 1:
                    t_logits = [
                        ensemble_teachers(
                            [torch.from_numpy(r[names["teacher"][k][0]][at]).to(dev) for r in every],
                            mix_weights,
                            teacher_mix,
                        )
                        for k in range(kinds)
                    ]
                else:
                    t_logits = [
                        _teacher_rows(rows, names["teacher"][k], at, store.num_classes, dev) for k in range(kinds)
                    ]
            temperature = ctkd(epoch) if ctkd is not None else cfg.temperature
            mixed = None
            if recipe.mix != "none":
                partner = mix[:, 0].long().numpy()
                mixed = (torch.from_numpy(train_ds.labels[partner]).long().to(dev), mix[:, 1].float().to(dev))
            total = _distill(cfg, epoch, y, s_logits, t_logits, temperature, mixed)
            if not torch.isfinite(total):
                raise KdcacheError(
                    f"training diverged at epoch {epoch} (loss {float(total)}): lower --lr or --kd-weight"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if ctkd is not None:
                ranks.average_grads(list(ctkd.parameters()))  # outside DDP's student
            optimizer.step()
            loss_sum += total.detach().item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        loss_sum, seen = ranks.sum([loss_sum, seen])
        # Rank 0's weights and BatchNorm statistics are the run's; it evaluates and tells the others.
        metrics = ranks.broadcast(
            evaluate(model, test_loader, test_ds.norm, dev, test_ds.num_classes) if ranks.main else None
        )
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            **metrics,
            "seconds": time.perf_counter() - t0,
        }
        if ctkd is not None:
            record["temperature"] = ctkd(epoch).detach().item()
        history.append(record)
        improved = metrics["test_top1"] > best
        best = max(best, metrics["test_top1"])
        if ranks.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_checkpoint(out / "best.pt", model, epoch=epoch, test_top1=best)
            extra = {"ctkd": ctkd.state_dict()} if ctkd is not None else {}
            save_checkpoint(
                last_path,
                model,
                optimizer=optimizer.state_dict(),
                epoch=epoch,
                best_top1=best,
                config=config_record,
                **extra,
            )
        ranks.barrier()
        if progress:
            tqdm.write(
                f"epoch {epoch:>3}  lr {lr:.4g}  loss {record['train_loss']:.4f}  top-1 {metrics['test_top1']:.2f}  "
                f"nll {metrics['test_nll']:.3f}  ece {metrics['test_ece']:.3f}  {record['seconds']:.1f}s"
            )
    for f in feeds:
        f.close()
    ranks.close()
    if plot and history and ranks.main:
        from kdcache.plots import plot_training

        plot_training({out.name: history}, out / "curves.png")
    return TrainResult(out, best, history[-1] if history else {}, history, ranks.main)


#: Settings a run folder made by an earlier kdcache does not record, with the values those runs used.
LEGACY_SETTINGS = {
    "view_schedule": "sample",
    "ctkd_decay": "cosine",
    "ctkd_decay_epochs": 10,
    "ctkd_decay_max": 0.0,
    "ctkd_decay_min": -1.0,
}


def _check_resume(stored: dict, record: dict, cfg: TrainConfig, out: Path, any_schedule: bool) -> str:
    """Refuse ``--resume`` when a setting differs from the run in ``out`` (naming it); returns the run's view schedule.

    A run started before a setting was recorded resumes with the value it was started with (``LEGACY_SETTINGS``);
    ``any_schedule`` (no ``--view-schedule`` given) continues the run's own schedule.
    """
    if cfg.ctkd and "ctkd_decay" not in stored:
        raise KdcacheError(
            f"the CTKD run in {out} was started before CTKD's lambda schedule moved one epoch earlier (as upstream): "
            "it cannot resume on the new schedule; start it again in a new --out"
        )
    stored = {**LEGACY_SETTINGS, **stored, "epochs": cfg.epochs}
    if any_schedule:
        record = {**record, "view_schedule": stored["view_schedule"]}
    diff = [k for k in sorted(stored.keys() | record.keys()) if stored.get(k) != record.get(k)]
    if diff:
        what = "; ".join(f"{k}: run has {stored.get(k)!r}, this command {record.get(k)!r}" for k in diff)
        raise KdcacheError(f"--resume with different settings than the run in {out} ({what}): use the original command")
    return stored["view_schedule"]


def _teacher_rows(
    rows: dict[str, np.ndarray], arrays: list[str], at: np.ndarray, num_classes: int, dev: torch.device
) -> torch.Tensor | TopKTeacher:
    """One kind's teacher outputs for a batch: a logit tensor, or a :class:`TopKTeacher` from a top-K cache."""
    parts = [torch.from_numpy(rows[a][at]).to(dev) for a in arrays]
    return parts[0] if len(parts) == 1 else TopKTeacher(*parts, num_classes)


def _verify_hashes(
    rows: dict[str, np.ndarray],
    names: dict[str, list[str]],
    idx: torch.Tensor,
    hashes: list[torch.Tensor],
    views: np.ndarray,
    kinds: int,
    offset: int,
) -> None:
    """Compare the pixel hashes the workers computed with the ones the teacher's views had (``rows`` start at sample
    ``offset``)."""
    ids = idx.numpy()
    for k in range(kinds):
        got = hashes[k].numpy().view(np.uint64)
        checked = got != 0
        if not checked.any():
            continue
        want = rows[names["view_hash"][k]][ids - offset]
        bad = checked & (got != want)
        if bad.any():
            i = int(ids[np.flatnonzero(bad)[0]])
            raise KdcacheError(
                f"view {int(views[i])} of sample {i} does not rebuild the teacher's pixels (hash mismatch): "
                "torch/torchvision changed augmentation behaviour since the dump; run `kdcache verify` or re-dump"
            )


def finished_run(run_dir: str | Path, epochs: int) -> list[dict] | None:
    """The metrics history of a run folder that already trained ``epochs`` epochs, else None (not started or cut
    off)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return rows if rows and rows[-1]["epoch"] >= epochs else None


def load_student(path: str | Path, name: str, num_classes: int) -> torch.nn.Module:
    """A trained student (``best.pt`` / ``last.pt``), usable as a teacher later."""
    return load_checkpoint(create_model(name, num_classes), path)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "train_student",
    "evaluate",
    "classification_metrics",
    "load_student",
    "finished_run",
]
