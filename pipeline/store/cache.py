"""The Zarr v3 logit cache: layout, creation, compatibility checks, completion records and the writer lock.

Layout of a cache (a Zarr v3 group; every array's axis 0 is the view index):

==================  ======================  =========  ==========================================
array               shape                   dtype      meaning
==================  ======================  =========  ==========================================
logits              (views, samples, C)     f16/f32    teacher logits of the weak (or only) view
logits_strong       (views, samples, C)     f16/f32    MLKD only: logits of the strong view
topk_values         (views, samples, K)     f16/f32    ``--format topk:K`` instead of logits: the K largest
topk_indices        (views, samples, K)     int16      their classes, largest first
row_stats           (views, samples, 6)     float32    full-row statistics (``fields``; :mod:`kdcache.store.formats`)
labels              (samples,)              int64      dataset labels, dataset index order
params              (views, samples, P)     float32    the view's random parameters (attr ``fields``)
params_strong       (views, samples, P')    float32    MLKD only
view_hash           (views, samples)        uint64     blake2b-64 of the view's uint8 CHW pixels
view_hash_strong    (views, samples)        uint64     MLKD only
done                (views, chunks)         uint8      1 once chunk ``c`` of view ``v`` is written
==================  ======================  =========  ==========================================

Top-k arrays of the strong view carry the ``_strong`` suffix too. The sample axis is in dataset index order and
chunked by :data:`CHUNK` rows; a chunk counts only once ``done`` says so (unwritten rows read back as NaN).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.common import JSON

from kdcache.errors import KdcacheError, first_line
from kdcache.store.formats import FULL, STAT_FIELDS, LogitFormat, parse_format, top1_and_confidence
from kdcache.store.locations import LOCK_NAME, READ_ONLY, check_not_read_only, check_url, local_path, url_protocol
from kdcache.store.manifest import MANIFEST_NAME, Manifest, read_manifest, remove_manifest
from kdcache.store.remote import ManifestStore, open_remote

FORMAT_VERSION = 2  # 1: full logits; 2: adds --format topk:K (full-logit stores are still written as 1)
CHUNK = 4096
# Fields a resumed or extended dump must match exactly.
IDENTITY_FIELDS = ("teacher", "dataset", "split", "recipe", "seed", "dtype", "num_classes", "views_mode", "format")
IDENTITY_DEFAULTS = {"format": "full"}  # stores written before a field existed


def num_chunks(num_samples: int) -> int:
    """Chunks along the sample axis."""
    return -(-num_samples // CHUNK)


def open_array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, which in a kdcache store is always an array (a group there means the store was edited)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise KdcacheError(f"{name} in the cache is a group, not an array (its zarr.json was edited or damaged)")
    return node


def json_int(value: JSON, what: str) -> int:
    """A number from a store's attributes as ``int()`` reads it; anything else is refused, naming ``what``."""
    if isinstance(value, str | int | float):
        return int(value)
    raise KdcacheError(f"attribute {what} is {value!r}, not a number (its zarr.json was edited or damaged)")


def json_float(value: JSON, what: str) -> float:
    """A number from a store's attributes as ``float()`` reads it; anything else is refused, naming ``what``."""
    if isinstance(value, str | int | float):
        return float(value)
    raise KdcacheError(f"attribute {what} is {value!r}, not a number (its zarr.json was edited or damaged)")


def json_dict(value: JSON, what: str) -> dict[str, JSON]:
    """A mapping from a store's attributes; anything else is refused, naming ``what``."""
    if isinstance(value, dict):
        return value
    raise KdcacheError(f"attribute {what} is {value!r}, not a mapping (its zarr.json was edited or damaged)")


def array_names(kinds: int, fmt: LogitFormat = FULL) -> dict[str, list]:
    """Per view kind, the names of its teacher arrays (a list per kind), params and hash arrays."""
    suffix = ["", "_strong"][:kinds]
    return {
        "teacher": [[f"{a}{s}" for a in fmt.arrays()] for s in suffix],
        "params": [f"params{s}" for s in suffix],
        "view_hash": [f"view_hash{s}" for s in suffix],
    }


class CacheStore:
    """An open cache. Read-only opens are safe from any number of processes while nothing writes."""

    def __init__(self, group: zarr.Group, location: str, manifest: Manifest | None = None):
        self.group = group
        self.location = location
        self._manifest = manifest
        attrs: dict[str, JSON] = dict(group.attrs)
        if "kdcache_format" not in attrs:
            raise KdcacheError(
                f"{location} is not a kdcache store (no kdcache_format attribute): pass a store made by `kdcache "
                "dump-logits`"
            )
        if json_int(attrs["kdcache_format"], "kdcache_format") > FORMAT_VERSION:
            raise KdcacheError(
                f"{location} has store format {attrs['kdcache_format']}, newer than this kdcache reads "
                f"({FORMAT_VERSION}): upgrade kdcache"
            )
        self.attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}
        self._absent: set[str] = set()

    @property
    def remote(self) -> bool:
        """Whether the store is read through its manifest from a URL (:mod:`kdcache.store.remote`)."""
        return isinstance(self.group.store, ManifestStore)

    @property
    def manifest(self) -> Manifest | None:
        """The store's manifest (``manifest.json``), None when it has none (a dump writes it on completion)."""
        if self._manifest is None and local_path(self.location) is not None:
            self._manifest = read_manifest(self.location)
        return self._manifest

    def read_file(self, key: str) -> bytes | None:
        """A file of the store that is no array (``README.md``), None when absent; a remote one is checked against
        the manifest."""
        root = local_path(self.location)
        if root is not None:
            path = root / key
            return path.read_bytes() if path.is_file() else None
        if isinstance(self.group.store, ManifestStore):
            return self.group.store.read_key(key)
        return None

    def array(self, name: str) -> zarr.Array:
        """Array ``name``, opened once: every ``group[name]`` re-reads and parses its metadata, which a writer cannot
        afford per chunk."""
        if name not in self._arrays:
            self._arrays[name] = open_array(self.group, name)
        return self._arrays[name]

    def has(self, name: str) -> bool:
        """Whether the store holds array ``name``, asked of the store once (arrays are only added when a store is
        created)."""
        if name in self._arrays:
            return True
        if name in self._absent:
            return False
        if name in self.group:
            self.array(name)
            return True
        self._absent.add(name)
        return False

    def attr_dict(self, name: str) -> dict[str, JSON]:
        """Attribute ``name`` that holds a mapping (``recipe``, ``dataset``, ``teacher``), refused when it does not."""
        return json_dict(self.attrs.get(name), name)

    @property
    def num_views(self) -> int:
        return int(self.array("done").shape[0])

    @property
    def format(self) -> LogitFormat:
        """How teacher rows are stored (``full`` for stores written before ``--format`` existed)."""
        return parse_format(str(self.attrs.get("format", "full")))

    def teacher_arrays(self, kind: int = 0) -> list[str]:
        """Names of the arrays holding one view kind's teacher outputs."""
        return array_names(self.num_kinds, self.format)["teacher"][kind]

    @property
    def num_samples(self) -> int:
        return json_int(self.attrs["num_samples"], "num_samples")

    @property
    def num_classes(self) -> int:
        return json_int(self.attrs["num_classes"], "num_classes")

    @property
    def num_kinds(self) -> int:
        return 2 if "view_hash_strong" in self.group else 1

    def row_bytes(self) -> int:
        """Bytes one sample of one view takes across the per-view arrays (teacher rows, parameters, hashes)."""
        names = array_names(self.num_kinds, self.format)
        arrays = [a for kind in names["teacher"] for a in kind] + names["view_hash"]
        arrays += [a for a in names["params"] if self.has(a)]
        opened = [open_array(self.group, a) for a in arrays]
        return sum(arr.dtype.itemsize * int(np.prod(arr.shape[2:])) for arr in opened)

    def done(self) -> np.ndarray:
        """Boolean (views, chunks) completion record."""
        return np.asarray(open_array(self.group, "done")[...]).astype(bool)

    def complete(self) -> bool:
        """True when every chunk of every view is written."""
        return bool(self.done().all())

    def labels(self) -> np.ndarray:
        return np.asarray(open_array(self.group, "labels")[...])

    def predictions(self, view: int) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's predicted class and confidence (max probability at T = 1) per sample of one view."""
        return top1_and_confidence({name: self.read(name, view) for name in self.teacher_arrays()})

    def top1(self, view: int, labels: np.ndarray | None = None) -> float:
        """Teacher top-1 accuracy of one stored view."""
        labels = self.labels() if labels is None else labels
        return float((self.predictions(view)[0] == labels).mean())

    def read(self, name: str, view: int, rows: slice | None = None) -> np.ndarray:
        """One contiguous read of array ``name`` at ``view`` (optionally a row range)."""
        arr = open_array(self.group, name)
        return np.asarray(arr[view] if rows is None else arr[view, rows])

    def locate_corruption(self, name: str) -> KdcacheError:
        """After a failed read of ``name``, find the first chunk that does not decode and describe it."""
        arr = open_array(self.group, name)
        n = self.num_samples
        for v in range(arr.shape[0]):
            for c in range(num_chunks(n)):
                try:
                    arr[v, c * CHUNK : min(n, (c + 1) * CHUNK)]
                except Exception as exc:
                    return KdcacheError(
                        f"cache {self.location}: array {name}, view {v}, chunk {c} is corrupt "
                        f"({exc.__class__.__name__}): "
                        "run `kdcache verify` and re-dump the cache"
                    )
        return KdcacheError(f"cache {self.location}: array {name} cannot be read: run `kdcache verify`")

    def sync_chunk(self, names: list[str], view: int, chunk: int | None) -> None:
        """fsync the files of chunk ``(view, chunk)`` of ``names`` (and their folders) on a local store.

        zarr writes each file to a temporary name and renames it, which survives a
        killed process; fsync makes the data survive a power loss too, before the
        completion record that vouches for it is written.
        """
        root = local_path(self.location)
        if root is None:
            return
        for name in names:
            ndim = len(self.array(name).shape)
            key = [str(view)] + ([str(chunk)] if chunk is not None else ["0"]) + ["0"] * (ndim - 2)
            path = root / name / "c" / Path(*key)
            for target in (path, path.parent):
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def refresh(self) -> None:
        """Re-read the attributes and re-open arrays, to see what other writers changed."""
        self.attrs = dict(self.group.attrs)
        self._arrays.clear()
        self._absent.clear()


def open_store(
    location: str | os.PathLike, mode: Literal["r", "r+"] = "r", cache_dir: str | os.PathLike | None = None
) -> CacheStore:
    """Open an existing cache (``mode`` "r" or "r+").

    A URL opened for reading goes through its manifest when it has one (:func:`~kdcache.store.remote.open_remote`:
    no folder listings, every file checked, what is fetched kept in ``cache_dir``); an ``http(s)://`` cache must have
    one. Other URLs without a manifest (a dump still writing to ``s3://``) are read directly.
    """
    loc = str(location)
    lp = local_path(loc)
    if lp is None:
        check_url(loc, "cache")
        opened = open_remote(loc, cache_dir) if mode == "r" else None
        if opened is not None:
            return CacheStore(opened[0], loc, opened[1])
        if url_protocol(loc) in READ_ONLY:
            raise KdcacheError(
                f"cache {loc} has no {MANIFEST_NAME}: a web server is read without listing folders, so only a "
                "published cache can be read there: run `kdcache publish STORE OUT` and serve OUT"
            )
    if lp is not None and not lp.exists():
        raise KdcacheError(f"cache {lp} not found: create it with `kdcache dump-logits --out {lp}`")
    if lp is not None and lp.is_file():
        raise KdcacheError(f"cache path {lp} is a file, not a Zarr store directory")
    try:
        # An absolute root: zarr's LocalStore lists no chunks under a relative one (nchunks_initialized reads 0).
        group = zarr.open_group(store=str(lp.resolve()) if lp is not None else loc, mode=mode)
    except KdcacheError:
        raise
    except Exception as exc:
        raise KdcacheError(f"cannot open cache {loc}: {first_line(exc)}") from None
    return CacheStore(group, loc)


def store_exists(location: str | os.PathLike) -> bool:
    """Whether ``location`` already holds a Zarr group."""
    lp = local_path(location)
    if lp is not None:
        return (lp / "zarr.json").is_file()
    try:
        zarr.open_group(store=str(location), mode="r")
        return True
    except Exception:
        return False


def _store_above(path: Path) -> Path | None:
    """The kdcache store at ``path`` or in a folder above it, if any."""
    for p in (path, *path.parents):
        meta = p / "zarr.json"
        if meta.is_file():
            try:
                if "kdcache_format" in json.loads(meta.read_text()).get("attributes", {}):
                    return p
            except (OSError, ValueError):
                continue
    return None


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output folder that is a file or lies in a cache store (a later --overwrite would delete it)."""
    out = Path(path)
    if out.is_file():
        raise KdcacheError(f"{flag} {path} is a file: give a folder path")
    store = _store_above(out.absolute())
    if store is not None:
        raise KdcacheError(f"{flag} {path} is inside the cache store {store}: choose a folder outside it")
    _check_writable(out, flag)
    return out


def make_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """:func:`check_output_dir`, then create the folder (a failure is one line naming it, not a traceback)."""
    out = check_output_dir(path, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdcacheError(
            f"{flag} {path} cannot be created ({exc.strerror or exc}): choose a folder you can write to"
        ) from None
    return out


def _check_writable(path: Path, flag: str) -> None:
    """Refuse a path whose nearest existing folder cannot be written (or is a file), before any work starts."""
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise KdcacheError(f"{flag} {path} is not writable ({parent} is not a folder you can write): choose another")


def check_writable_location(location: str | os.PathLike) -> None:
    """Refuse local store paths that are files, non-store directories or read-only, before anything is written."""
    lp = local_path(location)
    if lp is None:
        check_not_read_only(str(location), "--out")
        check_url(str(location), "--out")
        return
    store = _store_above(lp.absolute().parent)
    if store is not None:
        raise KdcacheError(f"--out {lp} is inside the cache store {store}: choose a path outside it")
    if lp.is_file():
        raise KdcacheError(f"--out {lp} is a file: give a directory path for the Zarr store")
    if lp.is_dir() and any(p.name != LOCK_NAME for p in lp.iterdir()) and not (lp / "zarr.json").is_file():
        raise KdcacheError(f"--out {lp} is a non-empty directory that is not a kdcache store: choose a new path")
    _check_writable(lp, "--out")


def remove_store(location: str | os.PathLike) -> None:
    """Delete a cache (``--overwrite``); only paths that hold a kdcache store are ever removed."""
    lp = local_path(location)
    if lp is not None:
        if lp.exists():
            open_store(lp)  # raises unless it is a kdcache store
            for child in lp.iterdir():  # the writer's own lock file stays
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        return
    open_store(location)  # raises unless it is a kdcache store
    remove_manifest(location)  # no reader takes the store for finished until its dump writes a new one
    zarr.open_group(store=str(location), mode="w")


def _row_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str, last_axis: str, **attrs: JSON) -> None:
    fill = 0 if np.dtype(dtype).kind == "i" else float("nan")
    group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(1, CHUNK, shape[2]),
        compressors=[ZstdCodec(level=1), Crc32cCodec()],
        fill_value=fill,
        dimension_names=("view", "sample", last_axis),
        attributes=attrs,
    )


def _teacher_arrays(
    group: zarr.Group, names: list[str], fmt: LogitFormat, views: int, n: int, num_classes: int, dtype: str
) -> None:
    if not fmt.is_topk:
        _row_array(group, names[0], (views, n, num_classes), dtype, "class")
        return
    _row_array(group, names[0], (views, n, fmt.k), dtype, "rank")
    _row_array(group, names[1], (views, n, fmt.k), "int16", "rank")
    _row_array(group, names[2], (views, n, len(STAT_FIELDS)), "float32", "field", fields=list(STAT_FIELDS))


def _view_arrays(group: zarr.Group, params: str, view_hash: str, fields: list[str], num_views: int, n: int) -> None:
    """One view kind's parameter array (when its recipe has parameters) and pixel-hash array."""
    if fields:
        group.create_array(
            params,
            shape=(num_views, n, len(fields)),
            dtype="float32",
            chunks=(1, CHUNK, len(fields)),
            fill_value=float("nan"),
            compressors=[ZstdCodec(level=1), Crc32cCodec()],
            dimension_names=("view", "sample", "field"),
            attributes={"fields": list(fields)},
        )
    group.create_array(
        view_hash,
        shape=(num_views, n),
        dtype="uint64",
        chunks=(1, CHUNK),
        fill_value=0,
        compressors=[ZstdCodec(level=1), Crc32cCodec()],
        dimension_names=("view", "sample"),
    )


def create_store(
    location: str | os.PathLike,
    *,
    num_views: int,
    labels: np.ndarray,
    num_classes: int,
    dtype: str,
    kinds: int,
    param_fields: list[list[str]],
    attrs: dict[str, object],
    fmt: LogitFormat = FULL,
) -> CacheStore:
    """Create an empty cache with every array allocated (NaN-filled) and the identity attributes written."""
    n = len(labels)
    loc = str(location)
    lp = local_path(loc)
    group = zarr.open_group(store=str(lp.resolve()) if lp is not None else loc, mode="a" if lp is not None else "w")
    names = array_names(kinds, fmt)
    for k in range(kinds):
        _teacher_arrays(group, names["teacher"][k], fmt, num_views, n, num_classes, dtype)
        _view_arrays(group, names["params"][k], names["view_hash"][k], param_fields[k], num_views, n)
    group.create_array(
        "labels",
        shape=(n,),
        dtype="int64",
        chunks=(max(n, 1),),
        compressors=[ZstdCodec(level=1), Crc32cCodec()],
        dimension_names=("sample",),
    )
    open_array(group, "labels")[...] = labels
    group.create_array(
        "done",
        shape=(num_views, num_chunks(n)),
        dtype="uint8",
        chunks=(1, num_chunks(n)),
        fill_value=0,
        compressors=[Crc32cCodec()],
        dimension_names=("view", "chunk"),
    )
    meta = {
        "kdcache_format": 2 if fmt.is_topk else 1,
        "format": fmt.to_attrs(),
        "num_samples": n,
        "num_classes": num_classes,
        "chunk_samples": CHUNK,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **attrs,
    }
    group.attrs.update(json.loads(json.dumps(meta)))
    return CacheStore(group, loc)


def extend_views(store: CacheStore, num_views: int) -> None:
    """Grow every per-view array to ``num_views`` views (new views start not done); the manifest goes until the
    extended dump completes and writes a new one."""
    remove_manifest(store.location)
    with warnings.catch_warnings():  # the manifest and card at the root are no Zarr nodes, and zarr says so
        warnings.simplefilter("ignore")
        names = list(store.group.array_keys())
    for name in names:
        arr = store.array(name)  # resized in place, so open handles see the new shape
        if name != "labels" and arr.shape[0] < num_views:
            arr.resize((num_views, *arr.shape[1:]))


def identity_mismatch(stored: Mapping[str, object], wanted: Mapping[str, object]) -> str | None:
    """The first identity field where a store and a requested dump differ, described, or None (a derived store
    differs from every dump: its views are renumbered or re-encoded, so it is never resumed or extended)."""
    if stored.get("derived_from") is not None:
        return "derived_from (it was made by `kdcache derive` or `kdcache pull --views/--kind`, not by dump-logits)"
    for key in IDENTITY_FIELDS:
        a, b = stored.get(key, IDENTITY_DEFAULTS.get(key)), wanted.get(key, IDENTITY_DEFAULTS.get(key))
        if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")
                return f"{key}.{sub} (store has {a.get(sub)!r}, this run {b.get(sub)!r})"
            return f"{key} (store has {a!r}, this run {b!r})"
    return None


VIEW_FIELDS = ("dataset", "split", "recipe", "seed", "views_mode", "num_classes")


def view_mismatch(a: CacheStore, b: CacheStore) -> str | None:
    """Why two caches do not hold the same views (recipe, seed, views, pixel hashes), or None when they do."""
    for key in VIEW_FIELDS:
        if json.dumps(a.attrs.get(key), sort_keys=True) != json.dumps(b.attrs.get(key), sort_keys=True):
            return f"{key} differs ({a.attrs.get(key)!r} vs {b.attrs.get(key)!r})"
    if a.num_views != b.num_views:
        return (
            f"{a.num_views} vs {b.num_views} views per sample (extend the smaller one: re-run its dump-logits with "
            f"--views {max(a.num_views, b.num_views)})"
        )
    for name in array_names(a.num_kinds)["view_hash"]:
        for v in range(a.num_views):
            if not np.array_equal(a.read(name, v), b.read(name, v)):
                return f"{name} of view {v} differs (the views have different pixels)"
    return None


def disk_bytes(location: str | os.PathLike) -> int | None:
    """Bytes a local store takes on disk (None for remote stores)."""
    lp = local_path(location)
    if lp is None or not lp.exists():
        return None
    return sum(f.stat().st_size for f in lp.rglob("*") if f.is_file())


@contextmanager
def writer_lock(location: str | os.PathLike) -> Iterator[None]:
    """Hold the single-writer lock of a local store: a file naming host and pid.

    A second writer is refused; a lock left by a dead process on this host is
    taken over. Remote stores have no lock (their writers must be coordinated
    by the caller).
    """
    lp = local_path(location)
    if lp is None:
        yield
        return
    made_dir = not lp.exists()
    try:
        lp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdcacheError(f"cannot create store {lp} ({exc.strerror}): choose a writable --out path") from None
    lock = lp / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as exc:
            raise KdcacheError(f"store {lp} is read-only ({exc.strerror}): choose a writable --out path") from None
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                lock.unlink(missing_ok=True)
                continue
            raise KdcacheError(
                f"{lp} is being written by pid {holder.get('pid')} on {holder.get('host')}: wait for it to finish "
                f"(or delete {lock} if that process is gone)"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if made_dir and not any(lp.iterdir()):
            lp.rmdir()  # a refused first dump leaves nothing behind


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
