"""The manifest of a finished cache: every file of the store with its size and sha256, in ``manifest.json`` at its
root.

A dump writes it when the cache is complete (``derive`` and ``publish`` too), so a reader never lists folders: an HTTP
server without directory listings serves the cache, each fetched file is checked against its entry before it is
used or kept, and a local copy proves itself by hashing. The manifest lists itself out (it cannot hold its own
hash), as it does the writer's lock and temporary or hidden files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError, first_line
from kdcache.store.locations import LOCK_NAME, local_path

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
MANIFEST_FORMAT = 1


def skipped(key: str) -> bool:
    """Whether a file of the store stays out of its manifest: the manifest itself, the lock, hidden and temp files."""
    name = key.rsplit("/", 1)[-1]
    return key in (MANIFEST_NAME, LOCK_NAME) or name.startswith(".") or name.endswith((".partial", ".tmp"))


@dataclass(frozen=True)
class Entry:
    """One file of a store: its size in bytes and sha256 (hex)."""

    size: int
    sha256: str

    def problem(self, data: bytes) -> str | None:
        """Why ``data`` is not this file (short, long or another sha256), or None."""
        if len(data) != self.size:
            return f"{len(data)} bytes where the manifest has {self.size}"
        if sha256_bytes(data) != self.sha256:
            return "its sha256 differs from the manifest's"
        return None


@dataclass
class Manifest:
    """Every file of a store by its key (``logits/c/0/1/0``), with when the manifest was made."""

    files: dict[str, Entry]
    created: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_bytes(self) -> bytes:
        doc = {
            "kdcache_manifest": MANIFEST_FORMAT,
            "created": self.created,
            "algorithm": "sha256",
            "total_bytes": self.total_bytes,
            "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(self.files.items())},
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    @property
    def digest(self) -> str:
        """sha256 of the manifest as written: names this exact cache."""
        return sha256_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Read a ``manifest.json``; a damaged one is refused in one line naming ``where``."""
        try:
            doc = json.loads(data)
            if int(doc["kdcache_manifest"]) > MANIFEST_FORMAT:
                raise KdcacheError(f"{where} has manifest format {doc['kdcache_manifest']}: upgrade kdcache")
            files = {str(k): Entry(int(v["size"]), str(v["sha256"])) for k, v in doc["files"].items()}
        except KdcacheError:
            raise
        except Exception as exc:
            raise KdcacheError(
                f"{where} is not a kdcache manifest ({first_line(exc)}): publish the store again (`kdcache publish`)"
            ) from None
        return cls(files, str(doc.get("created", "")))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def describe_key(key: str) -> str:
    """A store file in words: ``logits/c/1/0/0`` is "array logits, view 1, chunk 0"."""
    parts = key.split("/")
    if key == "zarr.json":
        return "the store's metadata (zarr.json)"
    if len(parts) == 2 and parts[1] == "zarr.json":
        return f"array {parts[0]}'s metadata"
    if len(parts) >= 3 and parts[1] == "c":
        if parts[0] == "labels":
            return "array labels"
        if parts[0] == "done":
            return f"array done, view {parts[2]}"
        chunk = f", chunk {parts[3]}" if len(parts) > 3 else ""
        return f"array {parts[0]}, view {parts[2]}{chunk}"
    return key


def _local_files(root: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_file() and not skipped(key):
            files[key] = path
    return files


def build_manifest(location: str | os.PathLike) -> Manifest:
    """The manifest of a store as it is now: every file hashed.

    For a local store, a file no newer than the manifest already there, of the size it lists, keeps that entry
    (a finished dump re-run rewrites nothing, and is not hashed again).
    """
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    root = local_path(location)
    if root is None:
        fs, base = _fs(str(location))
        found = fs.find(base, detail=True)
        keys = {p[len(base) :].lstrip("/"): p for p in found if found[p].get("type", "file") == "file"}
        entries = {k: _remote_entry(fs, p) for k, p in sorted(keys.items()) if not skipped(k)}
        return Manifest(entries, created)
    previous, since = _previous(root)
    files = {}
    for key, path in _local_files(root).items():
        st = path.stat()
        old = previous.get(key)
        if old is not None and old.size == st.st_size and since is not None and st.st_mtime_ns < since:
            files[key] = old
        else:
            files[key] = Entry(st.st_size, sha256_file(path))
    return Manifest(files, created)


def _remote_entry(fs: Any, path: str) -> Entry:
    data = fs.cat_file(path)
    return Entry(len(data), sha256_bytes(data))


def _previous(root: Path) -> tuple[dict[str, Entry], int | None]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}, None
    try:
        return Manifest.from_bytes(path.read_bytes(), str(path)).files, path.stat().st_mtime_ns
    except KdcacheError:
        return {}, None


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    return fs, str(base).rstrip("/")


def write_bytes(location: str | os.PathLike, key: str, data: bytes) -> None:
    """Write one file of a store: locally through a fsynced temp file and a rename (whole or absent), else with
    fsspec."""
    root = local_path(location)
    if root is None:
        fs, base = _fs(str(location))
        fs.pipe_file(f"{base}/{key}", data)
        return
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(location: str | os.PathLike) -> Manifest:
    """Hash the store's files and write ``manifest.json`` at its root (one line when the location refuses)."""
    manifest = build_manifest(location)
    try:
        write_bytes(location, MANIFEST_NAME, manifest.to_bytes())
    except OSError as exc:
        raise KdcacheError(
            f"cannot write the manifest of {location} ({exc.strerror or first_line(exc)}): free space or fix the "
            "location, then run `kdcache publish` on it"
        ) from None
    return manifest


def read_manifest(location: str | os.PathLike) -> Manifest | None:
    """The manifest of a local store (None when it has none)."""
    root = local_path(location)
    if root is None or not (root / MANIFEST_NAME).is_file():
        return None
    return Manifest.from_bytes((root / MANIFEST_NAME).read_bytes(), str(root / MANIFEST_NAME))


def remove_manifest(location: str | os.PathLike) -> None:
    """Drop the manifest of a store about to change (an extended dump writes a new one when it completes)."""
    root = local_path(location)
    if root is not None:
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        return
    fs, base = _fs(str(location))
    if fs.exists(f"{base}/{MANIFEST_NAME}"):
        fs.rm_file(f"{base}/{MANIFEST_NAME}")


def manifest_problems(root: Path, manifest: Manifest) -> list[str]:
    """Files of a local store that are missing, differ from the manifest, or are not in it, each in one line."""
    out = []
    present = _local_files(root)
    for key, entry in sorted(manifest.files.items()):
        path = present.get(key)
        if path is None:
            out.append(f"manifest: {key} ({describe_key(key)}) is listed but missing")
        elif path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            out.append(f"manifest: {key} ({describe_key(key)}) differs from the manifest (size or sha256)")
    out += [
        f"manifest: {key} is not in the manifest (written after it: run `kdcache publish` on the store)"
        for key in sorted(set(present) - set(manifest.files))
    ]
    return out
