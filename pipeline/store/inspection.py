"""Summaries of a cache for ``kdcache inspect``: attributes, completion, size, per-view teacher quality."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.store.cache import CacheStore, check_output_dir, disk_bytes, open_store, view_mismatch
from kdcache.store.checks import REDUMP, layout_problems, open_checked
from kdcache.store.formats import top1_and_confidence
from kdcache.store.manifest import CARD_NAME


@dataclass
class CacheReport:
    """What ``inspect`` prints (and plots)."""

    store: CacheStore
    done_chunks: int
    total_chunks: int
    disk_bytes: int | None
    top1: list[float]
    confidence: list[float]

    def lines(self) -> list[str]:
        a = self.store.attrs
        t = self.store.attr_dict("teacher")
        ds = self.store.attr_dict("dataset")
        out = [
            f"cache      {self.store.location}  (format {a['kdcache_format']}, created {a.get('created')})",
            f"dataset    {ds['name']} / {a['split']}: {ds['length']} samples, {a['num_classes']} classes",
            f"recipe     {_recipe_name(self.store.attr_dict('recipe'))}  "
            f"views {self.store.num_views} ({a['views_mode']})  "
            f"seed {a['seed']}  "
            f"dtype {a['dtype']}  "
            f"format {self.store.format}",
            f"teacher    {t['name']}  checkpoint sha256 {str(t['checkpoint_sha256'])[:16]}  block "
            f"{t['forward_block']}  amp {t['amp']}",
            f"complete   {self.done_chunks}/{self.total_chunks} chunks",
        ]
        if self.disk_bytes is not None:
            per = self.disk_bytes / max(1, self.store.num_views * self.store.num_samples)
            where = "size" if self.store.remote else "on disk"
            out.append(f"{where:<10} {self.disk_bytes / 2**20:.2f} MiB ({per:.1f} B per view-sample)")
        if self.top1:
            top = np.asarray(self.top1) * 100
            confidence = f"mean confidence {100 * np.mean(self.confidence):.1f}%" if self.confidence else "(recorded)"
            out.append(
                f"teacher    top-1 per view mean {top.mean():.2f}%  min {top.min():.2f}%  max {top.max():.2f}%  "
                + confidence
            )
        return out + share_lines(self.store)


def share_lines(store: CacheStore) -> list[str]:
    """What a person who finds the cache needs before reading it: manifest, provenance, card, how to train from it
    (attributes, manifest and card only; no chunk is read)."""
    from kdcache.store.card import read_card, train_command

    manifest = store.manifest
    out = [
        f"manifest   {len(manifest.files)} files, {manifest.total_bytes / 2**20:.2f} MiB, each with its sha256"
        if manifest is not None
        else "manifest   none (a dump writes it when it completes; `kdcache publish` writes one)"
    ]
    derived = store.attrs.get("derived_from")
    if isinstance(derived, dict):
        out.append(f"derived    from {derived.get('location')} (views {derived.get('views')}, {derived.get('format')})")
    card = read_card(store.read_file(CARD_NAME))
    facts = card.get("kdcache") if isinstance(card.get("kdcache"), dict) else {}
    if card:
        test = (facts.get("teacher") or {}).get("test_top1") if isinstance(facts, dict) else None
        shown = "not measured" if test is None else f"{float(test):.2f}%"
        out.append(f"card       {CARD_NAME}: license {card.get('license', 'unknown')}, teacher test top-1 {shown}")
    out.append(f"train      {train_command(store, store.location)}")
    return out


def _recipe_name(recipe: Mapping[str, object]) -> str:
    """The recipe's name, with the strong-view version for MLKD caches (absent in caches made before version 2)."""
    if recipe["name"] != "mlkd":
        return str(recipe["name"])
    return f"mlkd (strong views v{recipe.get('strong_version', 1)})"


def read_view(store: CacheStore, name: str, view: int) -> np.ndarray:
    """Array ``name`` at ``view``; a chunk that does not decode is named (array, view, chunk), as training does."""
    try:
        return store.read(name, view)
    except Exception:  # the codec pipeline raises anything on a checksum mismatch or a damaged file
        raise store.locate_corruption(name) from None


def view_predictions(store: CacheStore, view: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's predicted class and confidence per sample of one view, naming a chunk that does not decode."""
    return top1_and_confidence({name: read_view(store, name, view) for name in store.teacher_arrays()})


def metadata_report(store: CacheStore) -> CacheReport:
    """A cache's report from its metadata alone (attributes, array shapes, manifest): no chunk is read."""
    problems = layout_problems(store)
    if problems:
        raise KdcacheError(f"cache {store.location}: {problems[0]}: {REDUMP}; `kdcache verify` lists every problem")
    total = int(np.prod(store.array("done").shape))
    complete = store.attrs.get("complete") is True
    done = total if complete else int(store.done().sum())
    recorded = store.attrs.get("teacher_top1")
    top1 = [float(x) for x in recorded] if complete and isinstance(recorded, list) else []
    size = store.manifest.total_bytes if store.manifest is not None else None
    return CacheReport(store, done, total, size, top1, [])


def inspect_cache(location: str, cache_dir: str | None = None, metadata: bool | None = None) -> CacheReport:
    """Read a cache's attributes and compute per-view teacher accuracy and confidence on its finished views.

    ``metadata`` (the default for a remote cache) reports from the metadata alone (:func:`metadata_report`), with
    the per-view accuracy the dump recorded.
    """
    store = open_store(location, cache_dir=cache_dir)
    if metadata if metadata is not None else store.remote:
        return metadata_report(store)
    store = open_checked(location, cache_dir)
    done = store.done()
    labels = store.labels()
    top1, conf = [], []
    for v in range(store.num_views):
        if not done[v].all():
            continue
        pred, confidence = view_predictions(store, v)
        top1.append(float((pred == labels).mean()))
        conf.append(float(confidence.mean()))
    return CacheReport(store, int(done.sum()), int(done.size), disk_bytes(location), top1, conf)


@dataclass
class Agreement:
    """How several teachers cached on the same views agree, per view."""

    locations: list[str]
    top1: list[list[float]]  # [teacher][view]
    agree: list[float]  # share of samples where every teacher predicts the same class
    js: list[float] | None  # mean pairwise Jensen-Shannon divergence at T = 1 (nats); None for top-K caches

    def lines(self) -> list[str]:
        names = [f"T{j + 1}" for j in range(len(self.locations))]
        out = [f"{n}         {loc}" for n, loc in zip(names, self.locations, strict=True)]
        out.append(
            "view   "
            + "  ".join(f"{n + ' top-1':>10}" for n in names)
            + "  all agree"
            + ("  mean JS" if self.js else "")
        )
        for v in range(len(self.agree)):
            row = (
                f"{v:>4}   " + "  ".join(f"{100 * t[v]:>9.2f}%" for t in self.top1) + f"  {100 * self.agree[v]:>8.2f}%"
            )
            out.append(row + (f"  {self.js[v]:.4f}" if self.js else ""))
        if len(self.agree) > 1:
            a = np.asarray(self.agree) * 100
            out.append(
                f"agreement  mean {a.mean():.2f}%  min {a.min():.2f}% (view {int(a.argmin())})  max {a.max():.2f}%"
            )
        return out


def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row Jensen-Shannon divergence (nats) of two probability matrices."""
    m = (p + q) / 2
    safe = lambda a: np.where(a > 0, a, 1.0)  # noqa: E731  (0 · log 0 = 0)
    return ((p * np.log(safe(p) / safe(m))).sum(axis=1) + (q * np.log(safe(q) / safe(m))).sum(axis=1)) / 2


def teacher_agreement(locations: list[str], cache_dir: str | None = None) -> Agreement:
    """Per-view top-1 of each teacher, the share of samples where all agree, and their mean pairwise JS divergence."""
    stores = [open_checked(loc, cache_dir) for loc in locations]
    for other in stores[1:]:
        diff = view_mismatch(stores[0], other)
        if diff:
            raise KdcacheError(
                f"{stores[0].location} and {other.location} do not hold the same views ({diff}): "
                "teachers can only be compared on the same views"
            )
        if not other.complete() or not stores[0].complete():
            raise KdcacheError("compare finished caches only: re-run the unfinished cache's dump-logits command")
    labels = stores[0].labels()
    full = not any(st.format.is_topk for st in stores)
    top1: list[list[float]] = [[] for _ in stores]
    agree, js = [], []
    for v in range(stores[0].num_views):
        preds, probs = [], []
        for j, st in enumerate(stores):
            if full:  # one read serves both the prediction and the distribution
                z = read_view(st, "logits", v).astype(np.float64)
                e = np.exp(z - z.max(axis=1, keepdims=True))
                probs.append(e / e.sum(axis=1, keepdims=True))
                pred = z.argmax(axis=1)
            else:
                pred, _ = view_predictions(st, v)
            preds.append(pred)
            top1[j].append(float((pred == labels).mean()))
        agree.append(float(np.all([p == preds[0] for p in preds], axis=0).mean()))
        if full:
            pairs = [_js(probs[a], probs[b]).mean() for a in range(len(probs)) for b in range(a + 1, len(probs))]
            js.append(float(np.mean(pairs)))
    return Agreement([st.location for st in stores], top1, agree, js if full else None)


def inspect_caches(locations: list[str], plot: str | None = None, cache_dir: str | None = None) -> list[str]:
    """What ``kdcache inspect`` prints for one cache or several of the same views (with their agreement); ``plot``
    (``""`` for ``views.png``) also writes the per-view plot."""
    from kdcache.plots import plot_agreement, plot_views

    path = None if plot is None else Path(plot or "views.png")
    if path is not None:
        check_output_dir(path.absolute().parent, "--plot folder")
    lines: list[str] = []
    for location in locations:
        report = inspect_cache(location, cache_dir, None if path is None and len(locations) == 1 else False)
        lines += report.lines()
    if len(locations) > 1:
        agreement = teacher_agreement(list(locations), cache_dir)
        lines += agreement.lines()
        if path is not None:
            lines.append(f"plot       {plot_agreement(agreement.top1, agreement.agree, path)}")
        return lines
    if path is not None:
        if not report.top1:
            raise KdcacheError("no finished view to plot yet: finish the dump first")
        lines.append(f"plot       {plot_views(report.top1, report.confidence, path)}")
    return lines
