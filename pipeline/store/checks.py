"""Structural checks of a cache before use: attributes, arrays and shapes, lost chunks, labels."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.store.cache import CacheStore, array_names, num_chunks, open_store
from kdcache.store.locations import local_path
from kdcache.store.remote import RemoteError

#: Attributes every reader relies on, with the keys it reads inside them.
REQUIRED_ATTRS: dict[str, tuple[str, ...]] = {
    "num_samples": (),
    "num_classes": (),
    "dtype": (),
    "split": (),
    "seed": (),
    "views_mode": (),
    "recipe": ("name", "small"),
    "dataset": ("name", "length"),
    "teacher": ("name", "checkpoint_sha256", "forward_block", "amp"),
}


REDUMP = "restore the store, or dump it again (--overwrite or a new --out)"


DAMAGED = "(its zarr.json was edited or damaged)"


def per_view_arrays(store: CacheStore) -> list[str]:
    """The arrays with a row per (view, sample): teacher outputs, view hashes and (where the recipe has any) params."""
    names = array_names(store.num_kinds, store.format)
    params = [name for name in names["params"] if store.has(name)]
    return [name for kind in names["teacher"] for name in kind] + names["view_hash"] + params


def _attr_problems(attrs: Mapping[str, object]) -> list[str]:
    """The required attributes (or keys inside them) a store's ``zarr.json`` lacks."""
    out = []
    for name, keys in REQUIRED_ATTRS.items():
        value = attrs.get(name)
        if value is None or (keys and not isinstance(value, dict)):
            out.append(f"attribute {name!r} is missing {DAMAGED}")
        elif isinstance(value, dict):  # (a value that needs no keys inside may be anything)
            out += [f"attribute {name}.{k} is missing {DAMAGED}" for k in keys if k not in value]
    return out


def layout_problems(store: CacheStore) -> list[str]:
    """What keeps a cache from being read at all: required attributes or arrays that are missing, or shapes that
    disagree with ``num_samples`` and the view count of ``done``."""
    problems = _attr_problems(store.attrs)
    if problems:
        return problems
    kinds = store.attrs.get("view_kinds")
    if isinstance(kinds, list) and "weak" not in kinds:
        return [
            "it holds the strong views only (`kdcache pull --kind strong`), which no student trains from alone: pull "
            "it again with --kind both"
        ]
    names = ["done", "labels", *per_view_arrays(store)]
    problems = [f"array {name} is missing (its folder or zarr.json was lost)" for name in names if not store.has(name)]
    if problems:
        return problems
    n, views = store.num_samples, store.num_views
    for name in names:
        shape = tuple(store.array(name).shape)
        want = {"labels": (n,), "done": (views, num_chunks(n))}.get(name, (views, n))
        if shape[: len(want)] != want:
            problems.append(f"array {name} has shape {shape[: len(want)]}, but num_samples {n} needs {want}")
    return problems


def _labels_problem(store: CacheStore) -> str | None:
    """Why the stored labels are not the ones the cache was made with (``dataset.labels_sha256``, where recorded), or
    None.

    A chunk equal to its fill value is never written, so all-zero labels have no file; only the hash tells a lost
    chunk from those.
    """
    try:
        labels = np.ascontiguousarray(store.labels(), dtype=np.int64)
    except RemoteError:  # not fetched: nothing can be said of it
        raise
    except Exception:  # the codec pipeline raises anything on a damaged file
        return "array labels does not decode (its chunk file is damaged)"
    recorded = store.attr_dict("dataset").get("labels_sha256")
    if recorded is None or hashlib.sha256(labels.tobytes()).hexdigest() == recorded:
        return None
    if store.array("labels").nchunks_initialized < store.array("labels").nchunks:
        return "array labels has no data (its chunk file was lost)"
    return "array labels differs from the labels the cache was made with (dataset.labels_sha256)"


def holes(store: CacheStore) -> dict[str, str]:
    """Per array, its chunks marked done whose files are absent (they would read back as the fill value), described.

    A local store is searched file by file to name the first; elsewhere the stored chunks are counted. Top-1
    indices are skipped: a chunk whose top class is 0 throughout equals the fill value and is never written.
    """
    done = store.done()
    root = local_path(store.location)
    out = {"labels": problem} if (problem := _labels_problem(store)) else {}
    for name in per_view_arrays(store):
        if name.startswith("topk_indices") and store.format.k == 1:
            continue
        arr = store.array(name)
        if root is None:
            lost, where = int(done.sum()) - arr.nchunks_initialized, ""
        else:
            tail = ["0"] * (len(arr.shape) - 2)
            gone = [(v, c) for v, c in np.argwhere(done) if not Path(root, name, "c", str(v), str(c), *tail).exists()]
            lost, where = len(gone), f", view {gone[0][0]}, chunk {gone[0][1]}" if gone else ""
        if lost > 0:
            out[name] = f"array {name}{where} has no data although marked done ({lost} chunk file(s) lost)"
    return out


def check_cache(store: CacheStore) -> None:
    """Refuse a cache that lacks what a reader needs or has a hole, naming the first problem, the cause and the fix."""
    problems = layout_problems(store) or list(holes(store).values())
    if problems:
        raise KdcacheError(f"cache {store.location}: {problems[0]}: {REDUMP}; `kdcache verify` lists every problem")


def open_checked(location: str, cache_dir: str | os.PathLike[str] | None = None) -> CacheStore:
    """Open a cache for reading, refusing one that lacks attributes or arrays or has a hole (:func:`check_cache`); a
    URL keeps what it fetches in ``cache_dir``."""
    store = open_store(location, cache_dir=cache_dir)
    check_cache(store)
    return store
