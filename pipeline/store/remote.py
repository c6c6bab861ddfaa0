"""Reading a cache where it lies (``http(s)://``, ``s3://``, ``hf://``, any fsspec URL) through its manifest.

:class:`ManifestStore` is a read-only Zarr store that never lists a folder: its keys are the manifest's, a key not
in it is absent without a request, and every file fetched is checked against its size and sha256 before it is used.
What a run fetches is kept in a local read-through folder (``--cache-dir``, :func:`default_cache_dir`) by content
hash, so the next run, or the next student of a sweep, reads it from disk; a file is fetched only when a read needs
it. Processes sharing the folder take a file lock per file, so one fetches while the others wait and then read.

Fetches are retried (connection drops, timeouts, short or damaged bodies); what cannot be fetched is one line
naming the file (array, view, chunk) and the fix. Nothing is ever written to the remote location.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from kdcache.errors import KdcacheError, first_line
from kdcache.store.locations import check_url, parse_hub_url, resolve_cache_dir, url_protocol
from kdcache.store.manifest import MANIFEST_NAME, Entry, Manifest, describe_key

#: Tries per file (a first fetch and its retries), and the first pause between them (doubled each time).
FETCH_TRIES, BACKOFF_S = 4, 0.25
#: HTTP statuses that no retry mends.
FINAL_STATUS = (400, 401, 403, 404, 410)
#: Errors no retry mends either (huggingface_hub's offline mode).
FINAL_ERRORS = ("OfflineModeIsEnabled",)


class RemoteError(KdcacheError):
    """A file of a remote cache could not be fetched (after the retries)."""


class CorruptError(RemoteError):
    """A file fetched does not match its manifest entry (after the retries)."""


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the root path in it (HTTP reads get connect and read timeouts)."""
    import fsspec

    options: dict[str, Any] = {}
    if url_protocol(url) in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)}
    if url_protocol(url) == "hf":
        parse_hub_url(url)
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, str(root).rstrip("/")


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


class RemoteSource:
    """The files of a cache at ``url``, fetched with retries; counts what it fetched."""

    def __init__(self, url: str):
        check_url(url, "cache")
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url)
        self.fetched_bytes = 0
        self.fetched_files = 0

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _tries(self, key: str, what: str, call: Any) -> Any:
        """``call()`` until it succeeds or :data:`FETCH_TRIES` fail; a missing file raises FileNotFoundError."""
        last = ""
        for attempt in range(FETCH_TRIES):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                return call()
            except FileNotFoundError:
                raise
            except Exception as exc:
                if type(exc).__name__ in FINAL_ERRORS:
                    raise RemoteError(f"cache {self.url}: {what} {key} failed ({first_line(exc, 160)})") from None
                if _status(exc) in FINAL_STATUS:
                    raise RemoteError(
                        f"cache {self.url}: {key} ({describe_key(key)}) is refused by the server (HTTP "
                        f"{_status(exc)}): check the URL and your access to it"
                    ) from None
                last = f"{type(exc).__name__}: {first_line(exc, 100)}"
        raise RemoteError(
            f"cache {self.url}: {what} {key} failed {FETCH_TRIES} times ({last}): check the connection and the "
            "server, then run again (what was fetched is kept)"
        )

    def fetch(self, key: str) -> bytes:
        """The bytes of ``key`` (FileNotFoundError when the server has no such file)."""
        data = bytes(self._tries(key, "fetching", lambda: self.fs.cat_file(self.path(key))))
        self.fetched_bytes += len(data)
        self.fetched_files += 1
        return data

    def validator(self, key: str) -> str | None:
        """What tells whether ``key`` changed without fetching it (size and ETag or Last-Modified), when the
        server gives it."""
        info = self._tries(key, "asking for", lambda: self.fs.info(self.path(key)))
        stamp = [str(info.get(k)) for k in ("ETag", "etag", "LastModified", "Last-Modified", "mtime") if info.get(k)]
        return f"{info.get('size')}|{'|'.join(stamp)}" if stamp and info.get("size") is not None else None

    def fetch_verified(self, key: str, entry: Entry) -> bytes:
        """The bytes of ``key``, fetched again while they do not match ``entry``; one line naming the file when they
        never do or it is not on the server."""
        problem = ""
        for attempt in range(FETCH_TRIES):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                data = self.fetch(key)
            except FileNotFoundError:
                raise RemoteError(
                    f"cache {self.url}: {key} ({describe_key(key)}) is in its manifest but not on the server (not "
                    "found): the copy there is incomplete; publish it again"
                ) from None
            found = entry.problem(data)
            if found is None:
                return data
            problem = found
        raise CorruptError(
            f"cache {self.url}: {key} ({describe_key(key)}) does not match its manifest ({problem}) in "
            f"{FETCH_TRIES} fetches: the copy on the server is damaged; publish it again (nothing of it was kept)"
        )


class BlobCache:
    """The read-through folder: files by sha256 under ``blobs/``, manifests by URL under ``manifests/``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.verified: set[str] = set()

    def path(self, sha256: str) -> Path:
        return self.folder / "blobs" / sha256[:2] / sha256

    def get(self, entry: Entry) -> bytes | None:
        """A kept file, checked against ``entry`` once per process (a damaged one is dropped and fetched again)."""
        path = self.path(entry.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if entry.sha256 not in self.verified:
            if entry.problem(data) is not None:
                path.unlink(missing_ok=True)
                return None
            self.verified.add(entry.sha256)
        return data

    def put(self, name: Path, data: bytes) -> None:
        """Keep ``data`` at ``name`` (whole or not at all); a full or read-only folder is one line."""
        tmp = name.with_name(f".{name.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            name.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, name)
        except OSError as exc:
            raise KdcacheError(
                f"--cache-dir {self.folder}: cannot keep a fetched file ({exc.strerror or exc}): free space there or "
                "choose another --cache-dir"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def lock(self, sha256: str) -> Iterator[None]:
        """One fetch of a file at a time across threads and processes sharing the folder."""
        locks = self.folder / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{sha256[:2]}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def manifest_path(self, url: str) -> Path:
        return self.folder / "manifests" / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"


class BlobReader:
    """A file of a remote cache: from the read-through folder when kept there, else fetched, checked and kept."""

    def __init__(self, source: RemoteSource, blobs: BlobCache):
        self.source, self.blobs = source, blobs

    def read(self, key: str, entry: Entry) -> bytes:
        data = self.blobs.get(entry)
        if data is not None:
            return data
        with self.blobs.lock(entry.sha256):
            data = self.blobs.get(entry)  # another process may have fetched it meanwhile
            if data is None:
                data = self.source.fetch_verified(key, entry)
                self.blobs.put(self.blobs.path(entry.sha256), data)
                self.blobs.verified.add(entry.sha256)
        return data


def fetch_manifest(source: RemoteSource, blobs: BlobCache | None) -> Manifest | None:
    """The manifest of the cache at ``source`` (None when it has none): the kept copy when the server says it has
    not changed (size and ETag or Last-Modified), else fetched."""
    where = f"{source.url}/{MANIFEST_NAME}"
    try:
        validator = source.validator(MANIFEST_NAME)
    except FileNotFoundError:  # fsspec's HTTP info reads a dropped connection as not found too: the GET tells
        validator = None
    kept = blobs.manifest_path(source.url) if blobs is not None else None
    if validator is not None and kept is not None and kept.is_file():
        try:
            record = json.loads(kept.read_text())
            if record["validator"] == validator:
                return Manifest.from_bytes(record["manifest"].encode(), where)
        except (OSError, ValueError, KeyError, KdcacheError):
            pass
    try:
        data = source.fetch(MANIFEST_NAME)
    except FileNotFoundError:
        return None
    manifest = Manifest.from_bytes(data, where)
    if validator is not None and kept is not None and blobs is not None:
        blobs.put(kept, json.dumps({"validator": validator, "manifest": data.decode()}).encode())
    return manifest


def _sliced(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[len(data) - byte_range.suffix :]
    raise ValueError(f"unexpected byte range {byte_range!r}")


class ManifestStore(Store):
    """A read-only Zarr store over a remote cache's manifest: keys, sizes and hashes from it, bytes through a
    :class:`BlobReader`."""

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(self, reader: BlobReader, manifest: Manifest):
        super().__init__(read_only=True)
        self.reader, self.manifest = reader, manifest

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ManifestStore) and other.reader.source.url == self.reader.source.url

    def __str__(self) -> str:
        return self.reader.source.url

    def read_key(self, key: str) -> bytes | None:
        """The bytes of ``key`` (None when the manifest has no such file), synchronously."""
        entry = self.manifest.files.get(key)
        return None if entry is None else self.reader.read(key, entry)

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if key not in self.manifest.files:
            return None
        data = await asyncio.to_thread(self.read_key, key)
        assert data is not None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(_sliced(data, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return key in self.manifest.files

    async def set(self, key: str, value: Buffer) -> None:
        raise KdcacheError(f"cache {self}: a remote cache is read-only here: kdcache never writes to it")

    async def delete(self, key: str) -> None:
        raise KdcacheError(f"cache {self}: a remote cache is read-only here: kdcache never writes to it")

    async def list(self) -> AsyncIterator[str]:
        for key in sorted(self.manifest.files):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in sorted(self.manifest.files):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        lead = f"{prefix}/" if prefix else ""
        for name in sorted({k[len(lead) :].split("/")[0] for k in self.manifest.files if k.startswith(lead)}):
            yield name


def open_remote(url: str, cache_dir: str | os.PathLike | None = None) -> tuple[zarr.Group, Manifest] | None:
    """The Zarr group of the cache at ``url`` read through its manifest and the read-through folder, or None when
    ``url`` has no manifest."""
    source = RemoteSource(url)
    blobs = BlobCache(resolve_cache_dir(cache_dir))
    manifest = fetch_manifest(source, blobs)
    if manifest is None:
        return None
    if "zarr.json" not in manifest.files:
        raise KdcacheError(f"cache {url}: its manifest lists no zarr.json: it is not a kdcache store")
    store = ManifestStore(BlobReader(source, blobs), manifest)
    return zarr.open_group(store=store, mode="r", zarr_format=3), manifest
