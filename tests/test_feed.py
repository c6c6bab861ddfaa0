"""Stage two's reads: an epoch of a seeded cache larger than the memory budget reads about one view's worth."""

from pathlib import Path

import numpy as np
import pytest

from kdcache.errors import KdcacheError
from kdcache.feed.logits import LogitFeed, epoch_views
from kdcache.sizes import parse_size
from kdcache.store.cache import CHUNK, create_store, open_store

VIEWS, CHUNKS, CLASSES = 16, 3, 100


@pytest.fixture(scope="module")
def seeded_cache(tmp_path_factory) -> Path:
    """A 16-view cache of 3 chunks with random teacher rows, parameters and hashes (no teacher needed)."""
    path = tmp_path_factory.mktemp("feed") / "c.zarr"
    n = CHUNKS * CHUNK - 100
    store = create_store(
        path,
        num_views=VIEWS,
        labels=np.zeros(n, np.int64),
        num_classes=CLASSES,
        dtype="float16",
        kinds=1,
        param_fields=[["top", "left", "flip"]],
        attrs={},
    )
    rng = np.random.default_rng(0)
    store.group["logits"][...] = rng.normal(size=(VIEWS, n, CLASSES)).astype(np.float16)
    store.group["params"][...] = rng.integers(0, 9, size=(VIEWS, n, 3)).astype(np.float32)
    store.group["view_hash"][...] = rng.integers(0, 2**63, size=(VIEWS, n), dtype=np.uint64)
    return path


def _bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux's per-process I/O counter)."""
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


def _view_bytes(path: Path, names: list[str], view: int) -> int:
    """On-disk bytes of one view of ``names``: the chunk files under ``<array>/c/<view>/``."""
    return sum(f.stat().st_size for n in names for f in (path / n / "c" / str(view)).rglob("*") if f.is_file())


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
@pytest.mark.parametrize("schedule", ["chunk", "sample"])
def test_an_epoch_reads_about_one_view(seeded_cache, schedule):
    names = ["logits", "params", "view_hash"]
    store = open_store(seeded_cache)
    n = store.num_samples
    one_view = np.mean([_view_bytes(seeded_cache, names, v) for v in range(VIEWS)])
    feed = LogitFeed(store, names, memory_bytes=1 << 20)  # far below the cache's 10 MB
    assert not feed.whole
    for epoch in (0, 5):
        views = epoch_views(3, epoch, n, VIEWS, uniform=False, schedule=schedule)
        before = _bytes_read()
        rows = feed.get(epoch, views)
        ratio = (_bytes_read() - before) / one_view
        assert np.array_equal(rows["logits"], np.asarray(store.group["logits"][...])[views, np.arange(n)])
        if schedule == "chunk":
            assert ratio <= 1.2, f"an epoch read {ratio:.2f} views' worth"
        else:  # every chunk holds rows of nearly every view: the over-read the chunk schedule removes
            assert ratio > VIEWS / 2
    feed.close()


def test_every_sample_sees_every_view_once_per_cycle():
    n = 2 * CHUNK + 17
    cycle = np.stack([epoch_views(7, e, n, VIEWS, uniform=False) for e in range(VIEWS)])
    assert (np.sort(cycle, axis=0) == np.arange(VIEWS)[:, None]).all()
    chunk_of = np.arange(n) // CHUNK
    for e in range(VIEWS):  # one view index per chunk per epoch, chosen independently for each chunk
        assert all(len(np.unique(cycle[e, chunk_of == c])) == 1 for c in range(3))
    assert not np.array_equal(cycle[:, 0], cycle[:, CHUNK])
    next_cycle = np.stack([epoch_views(7, e, n, VIEWS, uniform=False) for e in range(VIEWS, 2 * VIEWS)])
    assert (np.sort(next_cycle, axis=0) == np.arange(VIEWS)[:, None]).all() and not np.array_equal(cycle, next_cycle)


def test_views_all_keeps_per_sample_draws():
    views = epoch_views(0, 3, CHUNK, 162, uniform=True)
    assert len(np.unique(views)) > 150


@pytest.mark.parametrize("text,size", [("512MiB", 512 << 20), ("4GiB", 4 << 30), ("2GB", 2 * 10**9), ("1000", 1000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense():
    with pytest.raises(KdcacheError, match="--cache-memory takes a size"):
        parse_size("lots")
