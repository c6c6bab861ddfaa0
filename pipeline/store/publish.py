"""``kdcache publish STORE OUT``: a finished cache as something to hand to others: its files copied into OUT (a
folder a web server serves, or an fsspec URL such as ``s3://``), each checked against the manifest, with a cache card
(``README.md``, :mod:`kdcache.store.card`) and a manifest that lists the card too. OUT the same as STORE publishes in
place (card and manifest only). Run again, it copies only what OUT lacks and keeps the card's licence fields.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.settings.table import PUBLISH_DEFAULTS as PB
from kdcache.store.cache import IDENTITY_FIELDS, CacheStore, check_output_dir
from kdcache.store.card import measure_test_top1, read_card, write_card_text
from kdcache.store.checks import open_checked
from kdcache.store.locations import check_not_read_only, check_url, local_path
from kdcache.store.manifest import CARD_NAME, MANIFEST_NAME, Entry, Manifest, build_manifest, sha256_bytes, write_bytes
from kdcache.store.pull import CopyStats, Destination, Item, LocalSource, Source, copy_items
from kdcache.store.remote import BlobCache, BlobReader, RemoteSource


@dataclass
class PublishSummary:
    """What a publish wrote."""

    store: str
    out: str
    files: int
    total_bytes: int
    stats: CopyStats | None
    test_top1: float | None

    def lines(self) -> list[str]:
        copied = f"; {self.stats.line('copied')}" if self.stats is not None else " (in place)"
        top1 = "not measured (pass --checkpoint)" if self.test_top1 is None else f"{self.test_top1:.2f}%"
        return [
            f"published  {self.store} -> {self.out}: {self.files} files, {self.total_bytes / 2**20:.2f} MiB{copied}",
            f"card       {self.out}/{CARD_NAME} (teacher test top-1 {top1}); fill in its license field",
            f"manifest   {self.out}/{MANIFEST_NAME}: every file with its size and sha256",
            f"train      kdcache train-student --cache URL ...  (URL: where {self.out} is served; see the card)",
        ]


class _ReaderSource:
    """A remote store's files through its read-through folder (what a run fetched is not fetched again)."""

    def __init__(self, store: CacheStore, cache_dir: str | os.PathLike | None):
        from kdcache.store.locations import resolve_cache_dir

        source = RemoteSource(store.location)
        self.url = source.url
        self.reader = BlobReader(source, BlobCache(resolve_cache_dir(cache_dir)))

    def fetch_verified(self, key: str, entry: Entry) -> bytes:
        return self.reader.read(key, entry)


def _source(store: CacheStore, cache_dir: str | os.PathLike | None) -> tuple[Source, Manifest]:
    """The store's files and its manifest (computed from the files of a local store dumped before manifests)."""
    root = local_path(store.location)
    if root is None:
        if store.manifest is None:
            raise KdcacheError(f"cache {store.location} has no {MANIFEST_NAME}: publish it from where it was made")
        return _ReaderSource(store, cache_dir), store.manifest
    return LocalSource(root), store.manifest or build_manifest(root)


def _check_out(out: str, store: CacheStore) -> None:
    """Refuse an OUT that cannot take the copy: read-only, a file, inside a store, or another cache or folder."""
    lp = local_path(out)
    if lp is None:
        check_not_read_only(out, "OUT")
        check_url(out, "OUT")
        return
    check_output_dir(lp.absolute().parent, "OUT")
    if lp.is_file():
        raise KdcacheError(f"OUT {lp} is a file: give a folder to publish into")
    if not lp.exists() or not any(lp.iterdir()):
        return
    if not (lp / "zarr.json").is_file():
        raise KdcacheError(f"OUT {lp} is not empty and holds no kdcache store: choose a new folder")
    try:
        there = json.loads((lp / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        there = {}
    if any(
        json.dumps(there.get(k), sort_keys=True) != json.dumps(store.attrs.get(k), sort_keys=True)
        for k in IDENTITY_FIELDS
    ):
        raise KdcacheError(f"OUT {lp} holds another cache: choose a new folder")


def _finish(dest: Destination, store: CacheStore, files: dict[str, Entry], test_top1: float | None) -> Manifest:
    """Write the card, then the manifest that lists it (the last file: its presence means the copy is whole)."""
    data = {k: e for k, e in files.items() if k != CARD_NAME}
    old = read_card(dest.read(CARD_NAME)) or read_card(store.read_file(CARD_NAME))  # a card edited in OUT wins
    card = write_card_text(store, Manifest(data), test_top1, old).encode()
    manifest = Manifest(
        {**data, CARD_NAME: Entry(len(card), sha256_bytes(card))},
        _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    try:
        dest.write(CARD_NAME, card)
        dest.write(MANIFEST_NAME, manifest.to_bytes())
    except OSError as exc:
        raise KdcacheError(
            f"cannot write into {dest.location} ({exc.strerror or exc}): choose a location you can write to"
        ) from None
    return manifest


def _same_place(a: str, b: str) -> bool:
    la, lb = local_path(a), local_path(b)
    return la is not None and lb is not None and la.absolute().resolve() == lb.absolute().resolve()


def publish_cache(
    store: str,
    out: str | os.PathLike,
    *,
    checkpoint: str | None = PB.checkpoint,
    data_root: str | None = PB.data_root,
    device: str = PB.device,
    cache_dir: str | os.PathLike | None = PB.cache_dir,
    progress: bool = True,
) -> PublishSummary:
    """Publish the finished cache ``store`` into ``out`` with its manifest and card (see the module docstring);
    ``checkpoint`` (the teacher's) measures its test top-1 for the card."""
    out = str(out)
    src = open_checked(str(store), cache_dir)
    if not src.complete():
        raise KdcacheError(f"cache {store} is not finished: re-run its dump-logits command, then publish it")
    in_place = _same_place(str(store), out)
    if not in_place:
        _check_out(out, src)
    elif not os.access(Path(str(local_path(out))), os.W_OK):
        raise KdcacheError(f"cache {store} is read-only here: publish it into another folder (OUT)")
    top1 = measure_test_top1(src, checkpoint, data_root, device) if checkpoint is not None else None
    source, manifest = _source(src, cache_dir)
    if in_place:
        manifest = build_manifest(str(store))  # the files as they are now
    dest = Destination(out)
    stats = None
    if not in_place:
        dest.clean()
        items = [Item(k, k, e) for k, e in sorted(manifest.files.items()) if k not in ("zarr.json", CARD_NAME)]
        stats = copy_items(items, source, dest, "publish", progress)
        for key in dest.keys() - {i.dest for i in items} - {"zarr.json", CARD_NAME}:
            dest.remove(key)
        write_bytes(out, "zarr.json", source.fetch_verified("zarr.json", manifest.files["zarr.json"]))
    final = _finish(dest, src, manifest.files, top1)
    return PublishSummary(str(store), out, len(final.files), final.total_bytes, stats, top1)
