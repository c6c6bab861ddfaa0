"""``kdcache pull URL DIR``: a verified, resumable local copy of a cache, or of some of its views or view kinds.

Every file is fetched through the source's manifest and checked (size and sha256) before it is written, each to a
temporary name and renamed, so a killed pull leaves only whole files. Run again, a pull keeps the files that
still match and fetches the rest (a corrupt or short file is fetched again). The store's own metadata (its root
``zarr.json`` and the manifest) is written last: until then the folder is no cache a reader would take.

``--views A:B`` keeps views A..B-1 (renumbered from 0) and ``--kind weak`` (or ``strong``) one view kind of an MLKD
cache; the chunk files are the source's, byte for byte, under their new keys, the array shapes and the attributes
(``teacher_top1``, ``derived_from``, ``view_kinds``) follow, and a new manifest lists the copy.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from kdcache import __version__
from kdcache.errors import KdcacheError, first_line
from kdcache.settings import check_options
from kdcache.settings.table import PULL_DEFAULTS as P
from kdcache.store.cache import IDENTITY_FIELDS
from kdcache.store.checks import open_checked
from kdcache.store.locations import check_not_read_only, check_url, local_path
from kdcache.store.manifest import (
    MANIFEST_NAME,
    Entry,
    Manifest,
    describe_key,
    read_manifest,
    sha256_file,
    skipped,
    write_bytes,
    write_manifest,
)
from kdcache.store.remote import CorruptError, RemoteSource, fetch_manifest

PULL_STATE = ".kdcache-pull.json"
THREADS = 4
KIND_NAMES = ("weak", "strong")


class Source(Protocol):
    url: str

    def fetch_verified(self, key: str, entry: Entry) -> bytes: ...


class LocalSource:
    """The files of a local store, each checked against its manifest as it is read."""

    def __init__(self, root: Path):
        self.root, self.url = root, str(root)

    def fetch_verified(self, key: str, entry: Entry) -> bytes:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            raise KdcacheError(
                f"{self.root}: {key} ({describe_key(key)}) is in the manifest but missing: run `kdcache verify "
                f"{self.root}`"
            ) from None
        problem = entry.problem(data)
        if problem is not None:
            raise CorruptError(
                f"{self.root}: {key} ({describe_key(key)}) does not match its manifest ({problem}): the store is "
                f"damaged: run `kdcache verify {self.root}`"
            )
        return data


def open_source(location: str) -> tuple[Source, Manifest]:
    """The files of the cache at ``location`` (a URL or a local store) and its manifest."""
    lp = local_path(location)
    if lp is not None:
        if not (lp / "zarr.json").is_file():
            raise KdcacheError(f"cache {lp} not found (no zarr.json there): give a kdcache store")
        manifest = read_manifest(lp)
        if manifest is None:
            raise KdcacheError(
                f"cache {lp} has no {MANIFEST_NAME} (its dump is not finished, or predates manifests): finish the "
                f"dump, or run `kdcache publish {lp} {lp}` to write one"
            )
        return LocalSource(lp), manifest
    check_url(location, "cache")
    source = RemoteSource(location)
    found = fetch_manifest(source, None)
    if found is None:
        raise KdcacheError(
            f"cache {location} has no {MANIFEST_NAME}: only a published cache can be copied without listing folders: "
            "run `kdcache publish STORE OUT` where it was made"
        )
    return source, found


class Destination:
    """Where copied files go: a local folder (temporary names, then a rename) or an fsspec URL."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self.root = local_path(self.location)
        self.fs: Any = None
        if self.root is None:
            import fsspec

            self.fs, base = fsspec.core.url_to_fs(self.location)
            self.base = str(base).rstrip("/")

    def matches(self, key: str, entry: Entry) -> bool:
        """Whether ``key`` is there already, whole and the same (by sha256)."""
        if self.root is not None:
            path = self.root / key
            return path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256
        url = f"{self.base}/{key}"
        return bool(self.fs.exists(url)) and entry.problem(self.fs.cat_file(url)) is None

    def write(self, key: str, data: bytes) -> None:
        write_bytes(self.location, key, data)

    def read(self, key: str) -> bytes | None:
        """The bytes of ``key`` there, None when absent."""
        if self.root is not None:
            path = self.root / key
            return path.read_bytes() if path.is_file() else None
        url = f"{self.base}/{key}"
        return bytes(self.fs.cat_file(url)) if self.fs.exists(url) else None

    def keys(self) -> set[str]:
        """The files there now (hidden and temporary ones left out)."""
        if self.root is not None:
            found = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        else:
            found = (p[len(self.base) :].lstrip("/") for p in self.fs.find(self.base))
        return {k for k in found if not skipped(k)}

    def remove(self, key: str) -> None:
        if self.root is not None:
            (self.root / key).unlink(missing_ok=True)
        else:
            self.fs.rm_file(f"{self.base}/{key}")

    def clean(self) -> None:
        """Drop the temporary files a killed copy left."""
        if self.root is not None:
            for path in self.root.rglob(".*.tmp"):
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Item:
    """One file to copy: its key in the copy, its key in the source, and what it must be."""

    dest: str
    src: str
    entry: Entry


@dataclass
class CopyStats:
    fetched_bytes: int = 0
    fetched_files: int = 0
    kept_bytes: int = 0
    kept_files: int = 0

    def line(self, verb: str = "fetched") -> str:
        return (
            f"{self.fetched_bytes / 2**20:.2f} MiB {verb} ({self.fetched_files} files), "
            f"{self.kept_bytes / 2**20:.2f} MiB already there ({self.kept_files} files)"
        )


def copy_items(items: list[Item], source: Source, dest: Destination, desc: str, progress: bool) -> CopyStats:
    """Copy what ``dest`` lacks of ``items`` (verified, a few files at a time), with a progress bar in bytes."""
    stats, todo = CopyStats(), []
    for item in items:
        if dest.matches(item.dest, item.entry):
            stats.kept_bytes += item.entry.size
            stats.kept_files += 1
        else:
            todo.append(item)
    bar = tqdm(
        total=sum(i.entry.size for i in todo),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=None if progress else True,
        dynamic_ncols=True,
    )

    def one(item: Item) -> int:
        data = source.fetch_verified(item.src, item.entry)
        _written(dest, item.dest, data)
        return len(data)

    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="kdcache-copy")
    try:
        for future in [pool.submit(one, item) for item in todo]:
            size = future.result()
            bar.update(size)
            stats.fetched_bytes += size
            stats.fetched_files += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return stats


def _written(dest: Destination, key: str, data: bytes) -> None:
    try:
        dest.write(key, data)
    except OSError as exc:
        raise KdcacheError(
            f"cannot write {key} into {dest.location} ({exc.strerror or first_line(exc)}): free space or choose "
            "another folder; run the same command again to go on"
        ) from None


def parse_view_range(views: str | int | None, num_views: int) -> range:
    """``--views A:B`` (A up to B, B left out), ``:B``, ``A:`` or ``N`` (the first N) of a cache of ``num_views``."""
    if views is None:
        return range(num_views)
    text = str(views).strip()
    head, sep, tail = text.partition(":")
    try:
        a, b = (int(head or 0), int(tail or num_views)) if sep else (0, int(text))
    except ValueError:
        a, b = -1, -1
    if not 0 <= a < b <= num_views:
        raise KdcacheError(
            f"--views {text} is not a range of this cache's views: give A:B with 0 <= A < B <= {num_views} (it "
            f"holds {num_views})"
        )
    return range(a, b)


def kept_kinds(kind: str | None, num_kinds: int) -> tuple[str, ...]:
    """The view kinds ``--kind`` keeps of a cache with ``num_kinds`` of them (None: all of them)."""
    check_options({"kind": kind})
    if kind is None or kind == "both":
        return KIND_NAMES[:num_kinds]
    if kind == "strong" and num_kinds < 2:
        raise KdcacheError("--kind strong: this cache has one view kind only (no strong views): use --kind weak")
    return (kind,)


def _array_kind(name: str) -> str | None:
    """``weak``/``strong`` for a view kind's per-view array, None for the arrays every kind shares."""
    if name in ("done", "labels"):
        return None
    return "strong" if name.endswith("_strong") else "weak"


def _per_view(meta: dict) -> bool:
    return (meta.get("dimension_names") or [None])[0] == "view"


def _subset_items(
    manifest: Manifest, arrays: dict[str, dict], keep: range, kinds: tuple[str, ...]
) -> tuple[list[Item], dict[str, bytes]]:
    """The chunk files of views ``keep`` and view kinds ``kinds`` under their new keys, and the array metadata."""
    items, meta = [], {}
    for name, info in sorted(arrays.items()):
        if _array_kind(name) not in (None, *kinds):
            continue
        if info.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/":
            raise KdcacheError(f"array {name} uses another chunk key encoding: pull the whole cache (no --views)")
        per_view = _per_view(info)
        for key, entry in manifest.files.items():
            parts = key.split("/")
            if not key.startswith(f"{name}/c/"):
                continue
            if per_view and int(parts[2]) not in keep:
                continue
            if per_view:
                parts[2] = str(int(parts[2]) - keep.start)
            items.append(Item("/".join(parts), key, entry))
        shape = [len(keep), *info["shape"][1:]] if per_view else info["shape"]
        meta[f"{name}/zarr.json"] = (json.dumps({**info, "shape": shape}, indent=2)).encode()
    return items, meta


def _subset_root(
    root: dict, url: str, manifest: Manifest, keep: range, kinds: tuple[str, ...], kind: str | None
) -> bytes:
    attrs = dict(root["attributes"])
    if isinstance(attrs.get("teacher_top1"), list):
        attrs["teacher_top1"] = attrs["teacher_top1"][keep.start : keep.stop]
    command = f"kdcache pull {url} DIR --views {keep.start}:{keep.stop}" + (f" --kind {kind}" if kind else "")
    attrs["derived_from"] = {
        "location": url,
        "manifest_sha256": manifest.digest,
        "created": attrs.get("created"),
        "views": [keep.start, keep.stop],
        "kinds": list(kinds),
        "format": attrs.get("format", "full"),
        "dtype": attrs.get("dtype"),
        "command": command,
        "kdcache": __version__,
    }
    attrs["view_kinds"] = list(kinds)
    return json.dumps({**root, "attributes": attrs}, indent=2).encode()


@dataclass
class PullSummary:
    """What a pull did."""

    source: str
    out: Path
    views: range
    kinds: tuple[str, ...]
    stats: CopyStats
    total_bytes: int

    def lines(self) -> list[str]:
        return [
            f"pulled     {self.source} -> {self.out}  (views {self.views.start}:{self.views.stop}, "
            f"{'+'.join(self.kinds)})",
            f"files      {self.stats.line()}; {self.total_bytes / 2**20:.2f} MiB in all, each checked against the "
            "manifest",
        ]


def _check_dir(out: Path, attrs: dict) -> None:
    """Refuse a DIR that is a file, inside a store, or holds something other than this cache or a pull of it."""
    if out.is_file():
        raise KdcacheError(f"DIR {out} is a file: give a folder for the copy")
    if not out.exists() or not any(out.iterdir()) or (out / PULL_STATE).is_file():
        return
    meta = out / "zarr.json"
    if not meta.is_file():
        raise KdcacheError(f"DIR {out} is not empty and holds no kdcache store: choose a new folder")
    try:
        there = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        there = {}
    diff = [
        k
        for k in IDENTITY_FIELDS
        if json.dumps(there.get(k), sort_keys=True) != json.dumps(attrs.get(k), sort_keys=True)
    ]
    if diff:
        raise KdcacheError(f"DIR {out} holds another cache ({diff[0]} differs): choose a new folder")


def _prepare_dir(out: Path, source: str, manifest: Manifest, keep: range, kinds: tuple[str, ...]) -> Destination:
    try:
        out.mkdir(parents=True, exist_ok=True)
        state = {"source": source, "manifest_sha256": manifest.digest, "views": [keep.start, keep.stop]}
        write_bytes(out, PULL_STATE, json.dumps({**state, "kinds": list(kinds)}).encode())
    except OSError as exc:
        raise KdcacheError(
            f"DIR {out} cannot be written ({exc.strerror or exc}): choose a folder you can write to"
        ) from None
    dest = Destination(out)
    dest.clean()
    return dest


def _metadata(source: Source, manifest: Manifest, have: Path | None, key: str) -> bytes:
    """A metadata file of the source: from an earlier copy in ``have`` when it is the same file, else fetched."""
    entry = manifest.files[key]
    if have is not None and (have / key).is_file():
        data = (have / key).read_bytes()
        if entry.problem(data) is None:
            return data
    return source.fetch_verified(key, entry)


def plan_pull(
    source: Source, manifest: Manifest, views: str | int | None, kind: str | None, have: Path | None = None
) -> tuple[list[Item], dict[str, bytes], dict, range, tuple[str, ...]]:
    """What a pull copies: files, then metadata written after them (the root ``zarr.json`` last; rewritten for a
    subset), the source's attributes, the views and the kinds kept."""

    def read(key: str) -> dict:
        return json.loads(_metadata(source, manifest, have, key))

    raw_root = _metadata(source, manifest, have, "zarr.json")
    root = json.loads(raw_root)
    attrs = root.get("attributes", {})
    if "kdcache_format" not in attrs:
        raise KdcacheError(f"{source.url} is not a kdcache store (no kdcache_format attribute)")
    arrays = {k.split("/")[0]: read(k) for k in manifest.files if k.count("/") == 1 and k.endswith("/zarr.json")}
    num_views = int(arrays["done"]["shape"][0])
    keep = parse_view_range(views, num_views)
    kinds = kept_kinds(kind, 2 if "view_hash_strong" in arrays else 1)
    if keep == range(num_views) and len(kinds) == (2 if "view_hash_strong" in arrays else 1):
        items = [Item(k, k, e) for k, e in sorted(manifest.files.items()) if k != "zarr.json"]
        return items, {"zarr.json": raw_root}, attrs, keep, kinds
    items, meta = _subset_items(manifest, arrays, keep, kinds)
    meta["zarr.json"] = _subset_root(root, source.url, manifest, keep, kinds, kind)
    return items, meta, attrs, keep, kinds


def pull_cache(
    url: str,
    out: str | os.PathLike,
    *,
    views: str | int | None = P.views,
    kind: str | None = P.kind,
    progress: bool = True,
) -> PullSummary:
    """Copy the cache at ``url`` (or views ``views`` / view kinds ``kind`` of it) into the local folder ``out``,
    every file checked against the manifest; run again, it goes on where it stopped."""
    dest_path = local_path(str(out))
    if dest_path is None:
        check_not_read_only(str(out), "DIR")
        raise KdcacheError(f"DIR {out}: pull copies into a local folder (`kdcache publish` writes to URLs)")
    source, manifest = open_source(url)
    items, meta, attrs, keep, kinds = plan_pull(
        source, manifest, views, kind, dest_path if dest_path.is_dir() else None
    )
    _check_dir(dest_path, attrs)
    dest = _prepare_dir(dest_path, source.url, manifest, keep, kinds)
    stats = copy_items(items, source, dest, "pull", progress)
    for key in dest.keys() - {i.dest for i in items} - set(meta):
        dest.remove(key)  # what an earlier pull of other views or kinds left
    for key, data in meta.items():  # array metadata, then the root zarr.json
        _written(dest, key, data)
    if len(meta) > 1:  # a subset: its own manifest
        copied = write_manifest(dest_path)
    else:
        _written(dest, MANIFEST_NAME, manifest.to_bytes())
        copied = manifest
    (dest_path / PULL_STATE).unlink(missing_ok=True)
    if "weak" in kinds:  # (the strong views alone are refused by every reader, which says why)
        open_checked(str(dest_path))
    return PullSummary(source.url, dest_path, keep, kinds, stats, copied.total_bytes)
