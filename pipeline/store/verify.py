"""``kdcache verify``: prove a cache is complete, uncorrupted and still replays the teacher's views.

Checks, each reported as a problem line rather than raised, so one run lists
everything: the attributes and arrays a cache needs are there with agreeing
shapes (:func:`layout_problems`; nothing else is read without them); every
chunk marked done has its file (:func:`holes`), decodes (its crc32c checksum
matches) and holds finite logits; every file matches the manifest's size and sha256
(where the cache has one); attributes agree with the arrays; and, with
a teacher and no lost or corrupt rows, ``sample`` random views of finished
chunks are rebuilt from their stored parameters, their pixel hashes compared
and the teacher re-run on them, which catches augmentation or model drift
after a library upgrade.
:func:`check_cache` raises the first layout problem or hole instead, for the
commands that read a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.dataset.datasets import build_dataset
from kdcache.errors import KdcacheError
from kdcache.settings import VERIFY_DEFAULTS as V
from kdcache.settings import check_options
from kdcache.store.cache import CHUNK, CacheStore, array_names, json_float, json_int, num_chunks, open_array, open_store
from kdcache.store.checks import REDUMP, holes, layout_problems, per_view_arrays
from kdcache.store.formats import encode
from kdcache.store.locations import local_path
from kdcache.store.manifest import manifest_problems
from kdcache.store.remote import CorruptError, RemoteError
from kdcache.teacher.runner import load_teacher
from kdcache.views.ops import pixel_hash
from kdcache.views.recipes import recipe_from_attrs


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
    lost = holes(store)
    report.problems += [("labels: " if name == "labels" else "missing: ") + line for name, line in lost.items()]
    names = [name for name in per_view_arrays(store) if name not in lost]  # a lost chunk reads as the fill value
    for name in sorted(names):
        arr = open_array(store.group, name)
        for v in range(arr.shape[0]):
            for c in range(num_chunks(n)):
                if not done[v, c]:
                    continue
                rows = slice(c * CHUNK, min(n, (c + 1) * CHUNK))
                try:
                    block = np.asarray(arr[v, rows])
                except CorruptError as exc:  # a remote file that does not match the manifest
                    report.problems.append(f"corrupt: {exc}")
                    continue
                except RemoteError:  # a file that cannot be fetched: nothing can be said of it
                    raise
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


def _rows_lost(report: VerifyReport) -> bool:
    """Whether some stored rows are lost or do not decode, so nothing may be computed from them."""
    return any(p.startswith(("corrupt", "missing", "labels")) for p in report.problems)


def _check_attrs(store: CacheStore, report: VerifyReport) -> None:
    a = store.attrs
    fmt = store.format
    main = open_array(store.group, fmt.arrays()[0])
    width = fmt.k if fmt.is_topk else a["num_classes"]
    if main.shape[2] != width:
        report.problems.append(
            f"attributes: format {fmt} with {a['num_classes']} classes but {fmt.arrays()[0]} has {main.shape[2]} "
            "columns"
        )
    if str(main.dtype) != a["dtype"]:
        report.problems.append(f"attributes: dtype {a['dtype']} but {fmt.arrays()[0]} is {main.dtype}")
    recipe = recipe_from_attrs(store.attr_dict("recipe"))
    kinds = a.get("view_kinds")
    strong = len(recipe.kinds) == 2 and (not isinstance(kinds, list) or "strong" in kinds)
    if (fmt.arrays()[0] + "_strong" in store.group) != strong:
        report.problems.append(f"attributes: recipe {recipe.name} does not match the arrays present")
    top1 = a.get("teacher_top1")
    readable = not _rows_lost(report)
    if top1 is not None and store.complete() and readable:
        if not isinstance(top1, list):
            report.problems.append(f"attributes: teacher_top1 is {top1!r}, not a list of per-view accuracies")
        elif len(top1) != store.num_views:
            report.problems.append(f"attributes: teacher_top1 has {len(top1)} entries for {store.num_views} views")
        else:
            labels = store.labels()
            for v in range(store.num_views):
                acc, recorded = store.top1(v, labels), json_float(top1[v], f"teacher_top1[{v}]")
                if abs(acc - recorded) > 1e-9:
                    report.problems.append(
                        f"attributes: teacher_top1[{v}] is {recorded:.6f} but the logits give {acc:.6f}"
                    )
                    break
    report.checked.append("attributes consistent with arrays")


def _replay_items(store: CacheStore, sample: int) -> tuple[np.ndarray, np.ndarray]:
    """``sample`` random (view, sample) pairs from finished chunks only: an unfinished one has no parameters yet."""
    rng = np.random.default_rng(0)
    cells = np.argwhere(store.done())[rng.integers(0, int(store.done().sum()), sample)]
    first = cells[:, 1] * CHUNK
    size = np.minimum(CHUNK, store.num_samples - first)
    return cells[:, 0], first + (rng.random(sample) * size).astype(np.int64)


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
    dataset, t = store.attr_dict("dataset"), store.attr_dict("teacher")
    ds = build_dataset(str(dataset["name"]), data_root, str(store.attrs["split"]))
    if ds.fingerprint() != dataset:
        report.problems.append("dataset: the data under --data-root differs from the data this cache was made from")
        return
    block = json_int(t["forward_block"], "teacher.forward_block")
    model = load_teacher(teacher, ds.num_classes, ds.norm, checkpoint, weights, device, block, str(t["amp"]))
    if model.checkpoint_sha256 != t["checkpoint_sha256"]:
        report.problems.append("teacher: --checkpoint is not the checkpoint this cache was made with (sha256 differs)")
    recipe = recipe_from_attrs(store.attr_dict("recipe"))
    names = array_names(len(recipe.kinds), store.format)
    labels = store.labels()
    views, samples = _replay_items(store, sample)
    bad_hash = bad_logits = 0
    worst = 0.0
    for v, i in zip(views.tolist(), samples.tolist(), strict=True):
        img = ds.image(i)
        for k in range(len(recipe.kinds)):
            p = store.array(names["params"][k])[v, i] if store.has(names["params"][k]) else np.zeros(0, np.float32)
            partner = recipe.partner_of(np.asarray(p)) if k == 0 else None
            pixels = recipe.apply(img, np.asarray(p), k, ds.image(partner) if partner is not None else None)
            if pixel_hash(pixels) != int(np.asarray(store.array(names["view_hash"][k])[v, i])):
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


def _check_manifest(store: CacheStore, report: VerifyReport) -> None:
    """Every file against the manifest: hashed here for a local store; a remote one's were checked as fetched."""
    manifest, root = store.manifest, local_path(store.location)
    if manifest is None:
        if store.complete():
            report.checked.append("no manifest (a dump writes one when it completes; `kdcache publish` writes one)")
        return
    if root is None:
        report.checked.append(f"every file fetched checked against the manifest ({len(manifest.files)} files)")
        return
    found = manifest_problems(root, manifest)
    report.problems += found
    report.checked.append(f"{len(manifest.files)} files hashed against the manifest ({len(found)} differ)")


def verify_cache(
    location: str,
    teacher: str | None = V.teacher,
    checkpoint: str | None = V.checkpoint,
    weights: str | None = V.weights,
    sample: int = V.sample,
    data_root: str | None = V.data_root,
    device: str = V.device,
    cache_dir: str | None = V.cache_dir,
) -> VerifyReport:
    """Check a cache and return every problem found (see the module docstring); a URL keeps what it fetches in
    ``cache_dir``."""
    check_options({"sample": sample})
    if sample and teacher is None:
        raise KdcacheError("--sample needs --teacher (and --checkpoint) to re-run the teacher")
    store = open_store(location, cache_dir=cache_dir)
    report = VerifyReport(str(location))
    report.problems += [f"layout: {line}; {REDUMP}" for line in layout_problems(store)]
    if report.problems:  # nothing else can be read without its attributes and arrays
        return report
    _check_chunks(store, report)
    _check_manifest(store, report)
    _check_attrs(store, report)
    if teacher is not None and sample:
        if _rows_lost(report) or not store.done().any():  # views cannot be rebuilt from lost or unwritten rows
            report.checked.append("replay skipped: no finished chunk, or the problems above come first")
            return report
        with torch.inference_mode():
            _check_replay(store, report, teacher, checkpoint, weights, sample, data_root, device)
    return report
