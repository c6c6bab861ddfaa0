"""``kdcache verify``: prove a cache is complete, uncorrupted and still replays the teacher's views.

Checks, each reported as a problem line rather than raised, so one run lists
everything: every chunk marked done; every stored chunk decodes (its crc32c
checksum matches) and its logits are finite; attributes agree with the arrays;
and, with a teacher, ``sample`` random views are rebuilt from their stored
parameters, their pixel hashes compared and the teacher re-run on them, which
catches augmentation or model drift after a library upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.data import build_dataset
from kdcache.errors import KdcacheError
from kdcache.store import CHUNK, CacheStore, array_names, num_chunks, open_store
from kdcache.teacher import load_teacher
from kdcache.topk import encode
from kdcache.views import pixel_hash, recipe_from_attrs


@dataclass
class VerifyReport:
    """Problems found (empty when the cache is clean) and what was checked."""

    location: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_chunks(store: CacheStore, report: VerifyReport) -> None:
    done = store.done()
    n = store.num_samples
    missing = np.argwhere(~done)
    if len(missing):
        v, c = missing[0]
        report.problems.append(
            f"incomplete: {len(missing)} chunks not written (first: view {v}, chunk {c}); re-run the dump command"
        )
    names = [name for name in store.group.array_keys() if name not in ("labels", "done")]
    for name in sorted(names):
        arr = store.group[name]
        for v in range(arr.shape[0]):
            for c in range(num_chunks(n)):
                if not done[v, c]:
                    continue
                rows = slice(c * CHUNK, min(n, (c + 1) * CHUNK))
                try:
                    block = np.asarray(arr[v, rows])
                except Exception as exc:  # the codec pipeline raises on a checksum mismatch
                    report.problems.append(
                        f"corrupt: array {name}, view {v}, chunk {c} does not decode ({exc.__class__.__name__}: "
                        f"{str(exc)[:80]}); re-dump that view with --overwrite or restore the file"
                    )
                    continue
                if (
                    name.startswith(("logits", "topk_values", "row_stats"))
                    and not np.isfinite(block.astype(np.float32)).all()
                ):
                    report.problems.append(f"non-finite: array {name}, view {v}, chunk {c} holds NaN or inf")
    report.checked.append(f"{int(done.sum())} chunks x {len(names)} arrays decoded")


def _check_attrs(store: CacheStore, report: VerifyReport) -> None:
    a = store.attrs
    fmt = store.format
    main = store.group[fmt.arrays()[0]]
    width = fmt.k if fmt.is_topk else a["num_classes"]
    if main.shape[1] != a["num_samples"] or store.group["labels"].shape[0] != a["num_samples"]:
        report.problems.append(
            f"attributes: num_samples {a['num_samples']} but {fmt.arrays()[0]} has {main.shape[1]} rows"
        )
    if main.shape[2] != width:
        report.problems.append(
            f"attributes: format {fmt} with {a['num_classes']} classes but {fmt.arrays()[0]} has {main.shape[2]} "
            "columns"
        )
    if str(main.dtype) != a["dtype"]:
        report.problems.append(f"attributes: dtype {a['dtype']} but {fmt.arrays()[0]} is {main.dtype}")
    recipe = recipe_from_attrs(a["recipe"])
    if (fmt.arrays()[0] + "_strong" in store.group) != (len(recipe.kinds) == 2):
        report.problems.append(f"attributes: recipe {recipe.name} does not match the arrays present")
    top1 = a.get("teacher_top1")
    readable = not any(p.startswith("corrupt") for p in report.problems)
    if top1 is not None and store.complete() and readable:
        if len(top1) != store.num_views:
            report.problems.append(f"attributes: teacher_top1 has {len(top1)} entries for {store.num_views} views")
        else:
            labels = store.labels()
            for v in range(store.num_views):
                acc = store.top1(v, labels)
                if abs(acc - top1[v]) > 1e-9:
                    report.problems.append(
                        f"attributes: teacher_top1[{v}] is {top1[v]:.6f} but the logits give {acc:.6f}"
                    )
                    break
    report.checked.append("attributes consistent with arrays")


def _check_replay(
    store: CacheStore,
    report: VerifyReport,
    teacher: str,
    checkpoint: str | None,
    weights: str | None,
    sample: int,
    data_root: str | None,
    device: str,
) -> None:
    a = store.attrs
    ds = build_dataset(a["dataset"]["name"], data_root, a["split"])
    if ds.fingerprint() != a["dataset"]:
        report.problems.append("dataset: the data under --data-root differs from the data this cache was made from")
        return
    t = a["teacher"]
    model = load_teacher(
        teacher, ds.num_classes, ds.norm, checkpoint, weights, device, int(t["forward_block"]), t["amp"]
    )
    if model.checkpoint_sha256 != t["checkpoint_sha256"]:
        report.problems.append("teacher: --checkpoint is not the checkpoint this cache was made with (sha256 differs)")
    recipe = recipe_from_attrs(a["recipe"])
    names = array_names(len(recipe.kinds), store.format)
    labels = store.labels()
    rng = np.random.default_rng(0)
    views = rng.integers(0, store.num_views, sample)
    samples = rng.integers(0, store.num_samples, sample)
    bad_hash = bad_logits = 0
    worst = 0.0
    for v, i in zip(views.tolist(), samples.tolist(), strict=True):
        img = ds.image(i)
        for k in range(len(recipe.kinds)):
            p = store.array(names["params"][k])[v, i] if store.has(names["params"][k]) else np.zeros(0, np.float32)
            partner = recipe.partner_of(np.asarray(p)) if k == 0 else None
            pixels = recipe.apply(img, np.asarray(p), k, ds.image(partner) if partner is not None else None)
            if pixel_hash(pixels) != int(store.array(names["view_hash"][k])[v, i]):
                bad_hash += 1
            teacher_rows = store.array(names["teacher"][k][0])
            stored = np.asarray(teacher_rows[v, i], dtype=np.float32)
            rows = encode(model(pixels[None]), torch.tensor([int(labels[i])]), store.format, teacher_rows.dtype.type)
            fresh = next(iter(rows.values()))[0].astype(np.float32)
            diff = float(np.abs(stored - fresh).max())
            worst = max(worst, diff)
            if diff > 1e-3 * max(1.0, float(np.abs(stored).max())):
                bad_logits += 1
    if bad_hash:
        report.problems.append(
            f"replay: {bad_hash} of {sample} rebuilt views have different pixels than the teacher saw "
            "(augmentation drift after a torch/torchvision upgrade?)"
        )
    if bad_logits:
        report.problems.append(
            f"replay: {bad_logits} of {sample} re-run teacher logits differ from the cache (max |diff| {worst:.3g})"
        )
    report.checked.append(f"{sample} random views rebuilt and re-run through {teacher} (max |logit diff| {worst:.3g})")


def verify_cache(
    location: str,
    teacher: str | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
    sample: int = 0,
    data_root: str | None = None,
    device: str = "auto",
) -> VerifyReport:
    """Check a cache and return every problem found (see the module docstring)."""
    if sample < 0:
        raise KdcacheError(f"--sample must be 0 or more, got {sample}")
    if sample and teacher is None:
        raise KdcacheError("--sample needs --teacher (and --checkpoint) to re-run the teacher")
    store = open_store(location)
    report = VerifyReport(str(location))
    _check_chunks(store, report)
    _check_attrs(store, report)
    if teacher is not None and sample:
        with torch.inference_mode():
            _check_replay(store, report, teacher, checkpoint, weights, sample, data_root, device)
    return report
