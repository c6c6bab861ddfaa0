"""``kdcache derive STORE OUT``: a smaller cache from a finished one, without the teacher.

``--views A:B`` keeps views A..B-1 (renumbered from 0, with their parameters and pixel hashes); ``--format topk:K``
keeps the K largest logits with the row statistics computed from the full logits by the very code a top-k dump
runs (:func:`kdcache.store.rows.teacher_rows`), so a top-k cache derived from a float32 full cache equals the top-k
cache dumped directly, bit for bit (from a float16 cache the statistics are those of the float16 logits);
``--dtype float16`` halves the logits as a float16 dump stores them. The result records what it was derived from
(``derived_from``), is written chunk by chunk with the dump's completion record (an interrupted derive resumes), and
gets a manifest and a card when it completes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.settings import check_options
from kdcache.settings.table import DERIVE_DEFAULTS as DV
from kdcache.store.cache import (
    CHUNK,
    CacheStore,
    array_names,
    check_writable_location,
    create_store,
    num_chunks,
    open_store,
    remove_store,
    store_exists,
    writer_lock,
)
from kdcache.store.card import read_card, write_card_text
from kdcache.store.checks import open_checked
from kdcache.store.formats import LogitFormat, parse_format
from kdcache.store.inspection import view_predictions
from kdcache.store.manifest import CARD_NAME, write_bytes, write_manifest
from kdcache.store.pull import parse_view_range
from kdcache.store.rows import mark_done, teacher_rows, write_chunk

#: Attributes a derived cache sets itself rather than taking from its source.
OWN_ATTRS = (
    *("kdcache_format", "format", "num_samples", "num_classes", "chunk_samples", "created", "complete"),
    *("teacher_top1", "dtype", "derived_from", "view_kinds"),
)


@dataclass
class DeriveSummary:
    """What a derive wrote."""

    source: str
    out: str
    views: range
    format: LogitFormat
    dtype: str
    written_chunks: int
    total_bytes: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"derived    {self.source} -> {self.out}: views {self.views.start}:{self.views.stop}, format "
            f"{self.format}, dtype {self.dtype}",
            f"written    {self.written_chunks} chunks; {self.total_bytes / 2**20:.2f} MiB with its manifest and card",
        ]
        return out + [f"note       {n}" for n in self.notes]


def _target(src: CacheStore, format: str | None, dtype: str | None) -> tuple[LogitFormat, str, list[str]]:
    """The derived cache's format and dtype, refused when its source cannot give them; notes for the summary."""
    check_options({"dtype": dtype})
    fmt = parse_format(format, src.num_classes) if format is not None else src.format
    have, want = str(src.attrs["dtype"]), dtype or str(src.attrs["dtype"])
    if have == "float16" and want == "float32":
        raise KdcacheError("--dtype float32: a float16 cache cannot give float32 logits: derive from a float32 cache")
    if src.format.is_topk and fmt != src.format:
        raise KdcacheError(
            f"--format {fmt}: {src.location} keeps only the top {src.format.k} logits of each row: derive another "
            "format from a full-logit cache"
        )
    notes = []
    if fmt.is_topk and not src.format.is_topk and have == "float16":
        notes.append(
            "top-k statistics computed from float16 logits; a top-k dump computes them from the teacher's float32 "
            "logits (derive from a float32 cache for a bit-identical result)"
        )
    return fmt, want, notes


def _attrs(src: CacheStore, keep: range, fmt: LogitFormat, dtype: str, command: str) -> dict[str, object]:
    attrs = {k: v for k, v in src.attrs.items() if k not in OWN_ATTRS}
    derived = {
        "location": src.location,
        "manifest_sha256": src.manifest.digest if src.manifest is not None else None,
        "created": src.attrs.get("created"),
        "views": [keep.start, keep.stop],
        "format": str(src.format),
        "dtype": src.attrs.get("dtype"),
        "command": command,
        "kdcache": __version__,
    }
    if "view_kinds" in src.attrs:
        attrs["view_kinds"] = src.attrs["view_kinds"]
    return {**attrs, "dtype": dtype, "derived_from": derived}


def _param_fields(src: CacheStore) -> list[list[str]]:
    names = array_names(src.num_kinds, src.format)["params"]
    return [[str(f) for f in src.array(n).attrs.get("fields", [])] if src.has(n) else [] for n in names]  # type: ignore[union-attr]


def _prepare(out: str, src: CacheStore, keep: range, fmt: LogitFormat, attrs: dict) -> tuple[CacheStore, bool]:
    """Open OUT to resume the same derive, or create it; anything else already there is refused."""
    if store_exists(out):
        dst = open_store(out, "r+")
        mine = {k: v for k, v in json.loads(json.dumps(attrs["derived_from"])).items() if k != "kdcache"}
        there = dst.attrs.get("derived_from")
        if not isinstance(there, dict) or {k: v for k, v in there.items() if k != "kdcache"} != mine:
            raise KdcacheError(f"OUT {out} already holds a cache: choose a new OUT")
        return dst, False
    dst = create_store(
        out,
        num_views=len(keep),
        labels=src.labels(),
        num_classes=src.num_classes,
        dtype=str(attrs["dtype"]),
        kinds=src.num_kinds,
        param_fields=_param_fields(src),
        attrs=attrs,
        fmt=fmt,
    )
    return dst, True


def _chunk_rows(src: CacheStore, v: int, rows: slice, fmt: LogitFormat, dtype: str, labels: torch.Tensor) -> tuple:
    """One chunk of source view ``v`` re-encoded: teacher rows per kind (as a dump encodes them), params, hashes."""
    names = array_names(src.num_kinds, src.format)
    samples = np.arange(rows.start, rows.stop)
    views = np.full(len(samples), v)
    if src.format.is_topk:  # top-k to top-k (the same K): only the values' dtype may change
        np_dtype = np.float16 if dtype == "float16" else np.float32
        teacher = []
        for kind in names["teacher"]:
            got = {n.removesuffix("_strong"): src.read(n, v, rows) for n in kind}
            teacher.append({**got, "topk_values": got["topk_values"].astype(np_dtype)})
    else:
        full = [torch.from_numpy(src.read(kind[0], v, rows).astype(np.float32)) for kind in names["teacher"]]
        teacher = teacher_rows(full, views, samples, labels, fmt, dtype)
    params = [src.read(p, v, rows) if src.has(p) else np.zeros((len(samples), 0), np.float32) for p in names["params"]]
    return teacher, params, [src.read(h, v, rows) for h in names["view_hash"]]


def _copy(src: CacheStore, dst: CacheStore, keep: range, dtype: str, progress: bool) -> int:
    """Write every chunk of ``dst`` not yet done from its source view, marking each done once written."""
    labels = torch.from_numpy(src.labels())
    done, n = dst.done(), src.num_samples
    todo = [(j, c) for j in range(len(keep)) for c in range(num_chunks(n)) if not done[j, c]]
    with tqdm(total=len(todo), unit="chunk", desc="derive", disable=None if progress else True) as bar:
        for j, c in todo:
            rows = slice(c * CHUNK, min(n, (c + 1) * CHUNK))
            teacher, params, hashes = _chunk_rows(src, keep.start + j, rows, dst.format, dtype, labels)
            write_chunk(dst, j, c, teacher, params, hashes)
            mark_done(dst, j, c)
            bar.update(1)
    return len(todo)


def _complete(dst: CacheStore, source: CacheStore) -> int:
    """Record per-view teacher accuracy (as a dump does), then the card and the manifest; the store's size."""
    dst.refresh()
    labels = dst.labels()
    dst.group.attrs["teacher_top1"] = [
        float((view_predictions(dst, v)[0] == labels).mean()) for v in range(dst.num_views)
    ]
    dst.group.attrs["complete"] = True
    dst.refresh()
    data = write_manifest(dst.location)  # the data's files, which the card counts
    data.files.pop(CARD_NAME, None)
    card = write_card_text(dst, data, None, read_card(source.read_file(CARD_NAME)))
    write_bytes(dst.location, CARD_NAME, card.encode())
    return write_manifest(dst.location).total_bytes


def derive_cache(
    store: str,
    out: str | os.PathLike,
    *,
    views: str | int | None = DV.views,
    format: str | None = DV.format,
    dtype: str | None = DV.dtype,
    cache_dir: str | os.PathLike | None = DV.cache_dir,
    progress: bool = True,
) -> DeriveSummary:
    """Derive a smaller cache ``out`` from the finished cache ``store`` (see the module docstring)."""
    out = str(out)
    src = open_checked(str(store), cache_dir)
    if not src.complete():
        raise KdcacheError(f"cache {store} is not finished: re-run its dump-logits command, then derive from it")
    keep = parse_view_range(views, src.num_views)
    fmt, dt, notes = _target(src, format, dtype)
    if keep == range(src.num_views) and fmt == src.format and dt == src.attrs["dtype"]:
        raise KdcacheError("nothing to derive: give --views A:B, --format topk:K or --dtype float16")
    check_writable_location(out)
    flags = [f"--views {keep.start}:{keep.stop}"] if views is not None else []
    flags += [f"--format {fmt}"] if format is not None else []
    command = " ".join(["kdcache derive", str(store), "OUT", *flags, *([f"--dtype {dt}"] if dtype else [])])
    attrs = _attrs(src, keep, fmt, dt, command)
    with writer_lock(out):
        dst, created = _prepare(out, src, keep, fmt, attrs)
        try:
            written = _copy(src, dst, keep, dt, progress)
        except BaseException:
            if created and not dst.done().any():
                remove_store(out)
            raise
        size = _complete(dst, src)
    return DeriveSummary(str(store), out, keep, fmt, dt, written, size, notes)
