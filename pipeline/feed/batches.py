"""Training batches for any PyTorch loop: the views a teacher saw, with its logits for exactly those views.

:class:`DistillLoader` is the public way to train from a cache in a loop of
your own; ``kdcache train-student`` is built on it. For each epoch
(``set_epoch``) it replays every sample's scheduled view from the stored
parameters, checks the pixel hashes against the teacher's on a sample of
batches, and pairs the views with the cached teacher rows, which
:class:`~kdcache.feed.logits.LogitFeed` gathers whole-chunk and prefetches. An online
teacher (a :class:`~kdcache.teacher.Teacher`) can stand in for the cache, on
the same views.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdcache.dataset.datasets import ImageDataset, build_dataset
from kdcache.devices import resolve_device
from kdcache.errors import KdcacheError
from kdcache.feed.logits import SCHEDULES, LogitFeed, epoch_order, epoch_views, reuse_warning
from kdcache.feed.ranks import Ranks
from kdcache.settings import TRAIN_DEFAULTS as T
from kdcache.settings import check_options, choices, old_names, read_values
from kdcache.settings.table import TRAIN
from kdcache.store.cache import CacheStore, array_names, open_store, view_mismatch
from kdcache.store.checks import check_cache
from kdcache.store.formats import LogitFormat, TopKTeacher
from kdcache.teacher.runner import Teacher
from kdcache.views.ops import pixel_hash
from kdcache.views.recipes import Recipe, make_recipe, normalize, parse_views, recipe_from_attrs

HASH_CHECK_EVERY = 16  # verify pixel hashes on every 16th batch (and the first) unless verify_views
TEACHER_MIXES = choices("teacher_mix")


def ensemble_teachers(logits: list[torch.Tensor], weights: list[float], mix: str = T.teacher_mix) -> torch.Tensor:
    """Several teachers' logits for the same views as one teacher signal, in float32.

    ``mix="logits"``: the weighted mean of the raw logits. ``mix="probs"``: the
    log of the weighted mean of the T = 1 softmax distributions, a logit vector
    whose softmax is the mixture. Either way the result is then treated as one
    teacher's logits: temperature and Z-score act on it.
    """
    if mix not in TEACHER_MIXES:
        raise ValueError(f"unknown teacher mix {mix!r}: choose 'logits' or 'probs'")
    w = torch.tensor(weights, dtype=torch.float32, device=logits[0].device) / sum(weights)
    stacked = torch.stack([t.float() for t in logits])
    if mix == "logits":
        return (w[:, None, None] * stacked).sum(dim=0)
    return torch.logsumexp(F.log_softmax(stacked, dim=2) + w.log()[:, None, None], dim=0)


@dataclass
class Batch:
    """One step's inputs, on the loader's device.

    ``views``: the normalized weak view (and the strong one for MLKD caches with ``kinds=2``), float32 NCHW.
    ``teacher``: per kind, the teacher's float32 logits of exactly those views (a :class:`TopKTeacher` from a top-K
    cache; empty when the loader has no teacher signal). ``ids``: sample indices. ``partner_labels`` and ``lam``: the
    mixing pair of mixup/CutMix views (the label is ``lam · labels + (1 − lam) · partner_labels``), else None.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    teacher: list
    ids: torch.Tensor
    partner_labels: torch.Tensor | None = None
    lam: torch.Tensor | None = None

    @property
    def mixed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(partner_labels, lam)`` for mixed views, as :func:`kdcache.losses.objective.cross_entropy` takes it."""
        if self.lam is None:
            return None
        assert self.partner_labels is not None, "a mixed batch has partner_labels"
        return self.partner_labels, self.lam


class StudentViews(Dataset):
    """Training views for one epoch: rebuilt from stored parameters (cache) or sampled from the recipe (online)."""

    def __init__(self, dataset: ImageDataset, recipe: Recipe, kinds: int):
        self.dataset, self.recipe, self.kinds = dataset, recipe, kinds
        self.params: list[np.ndarray] | None = None
        self.views = np.zeros(len(dataset), dtype=np.int64)
        self.view_seed, self.all_views, self.offset = 0, False, 0
        self.check = np.zeros(len(dataset), dtype=bool)

    def set_epoch(
        self,
        views: np.ndarray,
        check: np.ndarray,
        params: list[np.ndarray] | None = None,
        view_seed: int | None = None,
        all_views: bool = False,
        offset: int = 0,
    ) -> None:
        """The epoch's view per sample; stored ``params`` (row ``i - offset`` for sample ``i``) or online sampling
        from ``view_seed``."""
        self.views, self.check, self.params, self.all_views = views, check, params, all_views
        self.view_seed = view_seed or 0
        self.offset = offset

    def __len__(self) -> int:
        return len(self.dataset)

    def _online_params(self, i: int, k: int, img: np.ndarray) -> tuple[np.ndarray, int | None]:
        """View parameters sampled from the recipe, and the partner sample of a mixed weak view."""
        v = np.asarray([self.views[i]])
        if self.recipe.mix == "none" or k:
            return self.recipe.params(self.view_seed, int(v[0]), i, k, img.shape[:2], self.all_views), None
        partner = int(self.recipe.partners(self.view_seed, v, np.asarray([i]), len(self.dataset))[0])
        shapes = np.asarray([img.shape[:2]]), np.asarray([self.dataset.image(partner).shape[:2]])
        p = self.recipe.params_batch(
            self.view_seed, v, np.asarray([i]), k, shapes[0], self.all_views, np.asarray([partner]), shapes[1]
        )[0]
        return p, partner

    def __getitem__(self, i: int) -> tuple:
        img = self.dataset.image(i)
        pixels, hashes = [], []
        mix = np.asarray([i, 1.0])  # (partner, λ) of the weak view: itself with weight 1 unless mixed
        for k in range(self.kinds):
            if self.params is not None:
                p = self.params[k][i - self.offset]
                partner = self.recipe.partner_of(p) if k == 0 else None
            else:
                p, partner = self._online_params(i, k, img)
            if partner is not None:
                mix = np.asarray(self.recipe.mixing(p[None]), dtype=np.float64)[:, 0]
            x = self.recipe.apply(img, p, k, self.dataset.image(partner) if partner is not None else None)
            pixels.append(x)
            hashes.append(np.uint64(pixel_hash(x)).view(np.int64) if self.check[i] else np.int64(0))
        return i, int(self.dataset.labels[i]), pixels, hashes, mix


class EvalViews(Dataset):
    """The deterministic evaluation view of every test image, with its label."""

    def __init__(self, dataset: ImageDataset, recipe: Recipe):
        self.dataset, self.recipe = dataset, recipe

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return self.recipe.eval_view(self.dataset.image(i)), int(self.dataset.labels[i])


def cache_matches(store: CacheStore, ds: ImageDataset, augment: str | None, mix: str | None = None) -> Recipe:
    """Fail closed: the cache must be complete, whole (:func:`kdcache.store.verify.check_cache`), and made from this
    dataset, split and recipe; its recipe."""
    check_cache(store)
    if not store.complete():
        missing = int((~store.done()).sum())
        raise KdcacheError(
            f"cache {store.location} is incomplete ({missing} chunks missing): re-run its dump-logits command to "
            "finish it"
        )
    fp, stored = ds.fingerprint(), store.attr_dict("dataset")
    for key in ("name", "split", "length", "num_classes", "labels_sha256", "images_sha256", "files_sha256"):
        if stored.get(key) != fp.get(key):
            raise KdcacheError(
                f"cache {store.location} was made for other data: dataset {key} is {stored.get(key)!r} there, "
                f"{fp.get(key)!r} here; pass the matching --dataset/--data-root or dump a new cache"
            )
    recipe = recipe_from_attrs(store.attr_dict("recipe"))
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


def mixing_weights(cache_weights: str | list[float] | None, count: int, teacher_mix: str) -> list[float]:
    """The normalized weights of ``count`` teachers (equal by default) from ``--cache-weights``."""
    if teacher_mix not in TEACHER_MIXES:
        raise KdcacheError(f"unknown --teacher-mix {teacher_mix!r}: choose logits or probs")
    if cache_weights is None:
        weights = [1.0] * count
    elif isinstance(cache_weights, str):
        try:
            weights = [float(w) for w in cache_weights.split(",")]
        except ValueError:
            raise KdcacheError(
                f"--cache-weights takes one number per --cache, such as 0.5,0.5, not {cache_weights!r} "
                "(an online teacher's torchvision weights name goes to --weights)"
            ) from None
    else:
        weights = [float(w) for w in cache_weights]
    if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
        raise KdcacheError(
            f"--cache-weights needs {count} non-negative numbers (one per --cache) with a positive sum, "
            f"got {cache_weights!r}"
        )
    return [w / sum(weights) for w in weights]


def open_caches(
    caches: list[str], ds: ImageDataset, augment: str | None, mix: str | None, cache_dir: str | Path | None = None
) -> tuple[list[CacheStore], Recipe]:
    """Open every cache (a URL through its manifest, keeping what it fetches in ``cache_dir``), check each against
    the data, and check they hold the same views."""
    stores = [open_store(c, cache_dir=cache_dir) for c in caches]
    recipe = [cache_matches(st, ds, augment, mix) for st in stores][0]
    for other in stores[1:]:
        if stores[0].format.is_topk or other.format.is_topk:
            raise KdcacheError("several teachers need full-logit caches (--format full), not top-K ones")
        diff = view_mismatch(stores[0], other)
        if diff:
            raise KdcacheError(
                f"caches {stores[0].location} and {other.location} do not hold the same views: {diff}; "
                "dump every teacher with the same --dataset, --augment, --views and --seed"
            )
    return stores, recipe


def _cache_view_count(store: CacheStore, cache_views: int | None) -> tuple[int, bool]:
    """How many of a cache's views a run draws from, and whether they are the enumerated (``all``) views."""
    uniform = store.attrs["views_mode"] == "all"
    if cache_views is None:
        return store.num_views, uniform
    if uniform:
        raise KdcacheError(
            f"{store.location} enumerates all views in a fixed order, so its first views are not a random "
            "sample: use a cache of seeded views (--views N)"
        )
    if not 1 <= cache_views <= store.num_views:
        raise KdcacheError(
            f"--cache-views {cache_views} is out of range: the cache holds {store.num_views} views per sample"
        )
    return cache_views, False


def _online_views(
    ds: ImageDataset, augment: str | None, mix: str | None, alpha: float, views: str | int | None, epochs: int | None
) -> tuple[Recipe, int, bool]:
    """An online teacher's recipe and views: by default every discrete view, else one seeded view per epoch."""
    recipe = make_recipe(augment or ("cifar" if ds.small else "imagenet"), ds.small, mix or "none", alpha)
    if views is None and epochs is None and not recipe.num_discrete_views:
        raise KdcacheError(f"an online teacher on {recipe.name} views needs views= (seeded views) or epochs=")
    # Without epochs there are discrete views here (or views= is given): that was checked above.
    default = "all" if recipe.num_discrete_views or epochs is None else epochs
    num_views, mode = parse_views(views if views is not None else default, recipe)
    return recipe, num_views, mode == "all"


def _as_list(cache: str | Path | list | tuple | None) -> list[str]:
    return [] if cache is None else [str(cache)] if isinstance(cache, (str, Path)) else [str(c) for c in cache]


def eval_loader(dataset: ImageDataset, recipe: Recipe, workers: int = T.workers, batch: int = 256) -> DataLoader:
    """Batches of ``batch`` (uint8 evaluation view, label) pairs over ``dataset``, in order."""
    return DataLoader(EvalViews(dataset, recipe), batch_size=batch, num_workers=workers)


class DistillLoader:
    """One epoch's training batches (:class:`Batch`) from a cache (or several) and its dataset, for any loop.

    ``cache`` is a store written by ``kdcache dump-logits`` (or a list of stores of the same views from several
    teachers, combined per ``teacher_mix`` with ``cache_weights``); ``dataset`` is its dataset name (with
    ``data_root``) or an :class:`~kdcache.dataset.ImageDataset`. The loader fails closed on a cache of other data or
    recipe, an incomplete cache or a lost chunk; it checks the pixel hashes of every 16th batch (every batch with
    ``verify_views``) and stops at a non-finite teacher row. Call :meth:`set_epoch` (0-based) before each epoch:
    views and order are counter-based functions of ``(seed, epoch, sample)``, so a resumed loop draws what an
    uninterrupted one would. ``cache_scratch`` (a local folder) keeps each cache array there decompressed and
    memory-maps it, so every student of the cache on the machine shares one copy. A ``cache`` URL (``http(s)://``,
    ``s3://``, ``hf://``) is read where it lies through its manifest, keeping what it fetches in ``cache_dir``
    (default :func:`~kdcache.store.locations.default_cache_dir`). ``kinds=2`` yields MLKD's weak
    and strong views. Under torchrun (``ranks``) each process gets its shard and ``batch_size`` stays the global
    batch. Without a cache, ``teacher`` (an online :class:`~kdcache.teacher.Teacher`) labels views sampled from the
    recipe (``augment``, ``mix``, ``views``, ``view_seed``) exactly as a dump would have; ``with_teacher=False``
    yields views and labels only. ``epochs`` (if known) stops the prefetch of an epoch that will not come.
    """

    stores: list[CacheStore]

    @old_names(teacher_weights="cache_weights")
    def __init__(
        self,
        cache: str | Path | list[str] | None,
        dataset: str | ImageDataset,
        *,
        data_root: str | None = T.data_root,
        download: bool = T.download,
        batch_size: int = T.batch_size,
        seed: int = T.seed,
        kinds: int = 1,
        device: str | torch.device = T.device,
        workers: int = T.workers,
        verify_views: bool = T.verify_views,
        view_schedule: str = SCHEDULES[0],
        cache_views: int | None = T.cache_views,
        cache_memory: int | str = T.cache_memory,
        cache_scratch: str | Path | None = T.cache_scratch,
        cache_dir: str | Path | None = T.cache_dir,
        cache_weights: str | list[float] | None = T.cache_weights,
        teacher_mix: str = T.teacher_mix,
        teacher: Teacher | None = None,
        augment: str | None = T.augment,
        mix: str | None = T.mix,
        mix_alpha: float = T.mix_alpha,
        views: str | int | None = T.views,
        view_seed: int = T.view_seed,
        with_teacher: bool = True,
        epochs: int | None = None,
        ranks: Ranks | None = None,
    ):
        cache_memory, cache_weights = _checked_values(locals())
        caches = self.cache_locations = _as_list(cache)
        self.ranks = ranks or Ranks()
        self.device = resolve_device(device) if isinstance(device, str) else device
        _check_loader_args(caches, teacher, cache_weights, view_schedule, batch_size, self.ranks.world)
        self.dataset = (
            dataset if isinstance(dataset, ImageDataset) else build_dataset(dataset, data_root, "train", download)
        )
        self.seed, self.kinds, self.workers, self.verify_views = seed, kinds, workers, verify_views
        self.schedule, self.epochs, self.view_seed, self.teacher_mix = view_schedule, epochs, view_seed, teacher_mix
        self.batch_size = batch_size // self.ranks.world
        self.online = teacher if with_teacher else None
        self.stores, self.weights = [], [1.0]
        if caches:
            self.stores, self.recipe = open_caches(caches, self.dataset, augment, mix, cache_dir)
            self.weights = mixing_weights(cache_weights, len(caches), teacher_mix)
            self.num_views, self.uniform = _cache_view_count(self.stores[0], cache_views)
        else:
            online = _online_views(self.dataset, augment, mix, mix_alpha, views, epochs)
            self.recipe, self.num_views, self.uniform = online
        _check_kinds(kinds, self.recipe, self.stores)
        self.format = self.stores[0].format if self.stores else LogitFormat()
        self.names = array_names(len(self.recipe.kinds), self.format)
        self.lo, self.hi = self.ranks.shard(len(self.dataset))
        self.feeds = self._feeds(with_teacher, cache_memory, cache_scratch)
        self.samples = StudentViews(self.dataset, self.recipe, kinds)
        self.epoch = 0

    @property
    def store(self) -> CacheStore | None:
        """The (first) cache, or None for an online teacher."""
        return self.stores[0] if self.stores else None

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def _feeds(self, with_teacher: bool, memory: int, scratch: str | Path | None) -> list[LogitFeed]:
        """One feed per cache: the first reads views' parameters and hashes, every one its teacher rows."""
        if not self.stores:
            return []
        kinds, first = range(self.kinds), self.stores[0].group
        views = [a for k in kinds for a in (self.names["params"][k], self.names["view_hash"][k]) if a in first]
        logits = [a for k in kinds for a in self.names["teacher"][k]] if with_teacher else []
        stores = self.stores if with_teacher else self.stores[:1]
        return [
            LogitFeed(s, (views if j == 0 else []) + logits, memory, (self.lo, self.hi), scratch, self.num_views)
            for j, s in enumerate(stores)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s (0-based) views and order on the next iteration."""
        self.epoch = epoch

    def epoch_views(self, epoch: int) -> np.ndarray:
        """The stored view index every sample uses in 0-based ``epoch``."""
        n = len(self.dataset)
        return epoch_views(self.seed, epoch, n, self.num_views, self.uniform, self.schedule)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's shard in the epoch's order, padded with its own first samples to the common length."""
        order = self.lo + epoch_order(self.seed, epoch, self.hi - self.lo)
        order = np.concatenate([order, order[: self.ranks.steps_size(len(self.dataset)) - len(order)]])
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:
        return math.ceil(self.ranks.steps_size(len(self.dataset)) / self.batch_size)

    def reuse_note(self, epochs: int) -> str | None:
        """A warning when ``epochs`` is more than the views there are to draw from (views get reused)."""
        has_views = self.stores or self.online is not None
        return reuse_warning(epochs, self.num_views, self.uniform) if has_views else None

    def _rows(self, epoch: int, views: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Every cache's rows for the epoch (prefetching the next epoch's)."""
        shard = views[self.lo : self.hi]
        rows = [f.get(epoch, shard) for f in self.feeds]
        if self.epochs is None or epoch + 1 < self.epochs:
            upcoming = self.epoch_views(epoch + 1)[self.lo : self.hi]
            for f in self.feeds:
                f.prefetch(epoch + 1, upcoming)
        return rows

    def __iter__(self) -> Iterator[Batch]:
        views, batches = self.epoch_views(self.epoch), self._batches(self.epoch)
        rows = self._rows(self.epoch, views)
        check = np.zeros(len(self.dataset), dtype=bool)
        if rows:
            for b, idx in enumerate(batches):
                check[idx] |= self.verify_views or b % HASH_CHECK_EVERY == 0
            empty = np.zeros((self.hi - self.lo, 0), np.float32)
            params = [rows[0].get(self.names["params"][k], empty) for k in range(self.kinds)]
            self.samples.set_epoch(views, check, params, offset=self.lo)
        else:
            self.samples.set_epoch(views, check, None, self.view_seed, self.uniform)
        # torch types a batch of indices as a list; DataLoader takes any sequence of them, such as these arrays
        loader = DataLoader(self.samples, batch_sampler=batches, num_workers=self.workers)  # type: ignore[arg-type]
        for idx, y, pixels, hashes, mix in loader:
            if rows:
                self._check_hashes(rows[0], idx, hashes, views)
            yield self._batch(idx, y, pixels, mix, rows)

    def _batch(self, idx: torch.Tensor, y: torch.Tensor, pixels: list, mix: torch.Tensor, rows: list) -> Batch:
        dev, norm = self.device, self.dataset.norm
        x = [normalize(p.to(dev, non_blocking=True), norm.mean, norm.std) for p in pixels]
        batch = Batch(x, y.to(dev), self._teacher(idx, pixels, rows), idx)
        if self.recipe.mix != "none":
            partner = mix[:, 0].long().numpy()
            batch.partner_labels = torch.from_numpy(self.dataset.labels[partner]).long().to(dev)
            batch.lam = mix[:, 1].float().to(dev)
        return batch

    def _teacher(self, idx: torch.Tensor, pixels: list, rows: list[dict[str, np.ndarray]]) -> list:
        """Per kind, the teacher's logits of the batch: run online, one cache's rows, or several caches mixed."""
        if self.online is not None:
            return [self.online(p).to(self.device) for p in pixels]
        if not rows or self.names["teacher"][0][0] not in rows[-1]:
            return []
        at, dev = idx.numpy() - self.lo, self.device
        if len(rows) > 1:
            return [
                ensemble_teachers(
                    [torch.from_numpy(r[self.names["teacher"][k][0]][at]).to(dev) for r in rows],
                    self.weights,
                    self.teacher_mix,
                )
                for k in range(self.kinds)
            ]
        parts = [
            [torch.from_numpy(rows[0][a][at]).to(dev) for a in self.names["teacher"][k]] for k in range(self.kinds)
        ]
        return [p[0].float() if len(p) == 1 else TopKTeacher(p[0], p[1], p[2], self.num_classes) for p in parts]

    def _check_hashes(self, rows: dict[str, np.ndarray], idx: torch.Tensor, hashes: list, views: np.ndarray) -> None:
        """Compare the pixel hashes the workers computed with the ones the teacher's views had."""
        ids = idx.numpy()
        for k in range(self.kinds):
            got = hashes[k].numpy().view(np.uint64)
            checked = got != 0
            if not checked.any():
                continue
            bad = checked & (got != rows[self.names["view_hash"][k]][ids - self.lo])
            if bad.any():
                i = int(ids[np.flatnonzero(bad)[0]])
                raise KdcacheError(
                    f"view {int(views[i])} of sample {i} does not rebuild the teacher's pixels (hash mismatch): "
                    "torch/torchvision changed augmentation behaviour since the dump; run `kdcache verify` or re-dump"
                )

    def close(self) -> None:
        """Stop the background reads."""
        for f in self.feeds:
            f.close()

    def __enter__(self) -> DistillLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked_values(given: dict[str, Any]) -> tuple[int, list[float] | None]:
    """Refuse a DistillLoader argument that breaks the settings table's rules; the cache memory and mixing weights
    read from text as the command line gives them (``"4GiB"``, ``"0.5,0.5"``)."""
    values = read_values(TRAIN, {"cache_memory": given["cache_memory"], "cache_weights": given["cache_weights"]})
    names = ("batch_size", "seed", "workers", "view_schedule", "cache_views", "teacher_mix", "augment", "mix")
    check_options({**{k: given[k] for k in (*names, "mix_alpha", "view_seed", "epochs")}, **values})
    if given["kinds"] not in (1, 2):
        raise KdcacheError(f"kinds is 1 (one view per sample) or 2 (MLKD's weak and strong), got {given['kinds']!r}")
    return values["cache_memory"], values["cache_weights"]  # type: ignore[return-value]


def _check_kinds(kinds: int, recipe: Recipe, stores: list[CacheStore]) -> None:
    """Refuse MLKD's two view kinds from a recipe or a cache that lacks the strong ones."""
    if stores and kinds > stores[0].num_kinds and len(recipe.kinds) == 2:
        raise KdcacheError(
            f"cache {stores[0].location} holds the weak views only (pulled with --kind weak): --loss mlkd needs the "
            "strong ones too: pull it with --kind both"
        )
    if kinds > len(recipe.kinds):
        raise KdcacheError(
            "--loss mlkd needs weak and strong views: use a cache dumped with --augment mlkd (or --augment mlkd online)"
        )


def _check_loader_args(
    caches: list[str], teacher: Teacher | None, cache_weights: object, schedule: str, batch_size: int, world: int
) -> None:
    if caches and teacher is not None:
        raise KdcacheError("pass either --cache or --teacher, not both")
    if cache_weights is not None and len(caches) < 2:
        raise KdcacheError("--cache-weights mixes several teachers: pass one --cache per teacher (two or more)")
    if batch_size % world:
        raise KdcacheError(
            f"--batch-size {batch_size} is the global batch and must divide among {world} processes: "
            f"use a multiple of {world}"
        )
