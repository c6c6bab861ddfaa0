"""A scratch-folder feed: students of one cache on one machine map one decompressed copy of its arrays."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache.dataset.datasets import build_dataset
from kdcache.dump.loop import dump_logits
from kdcache.errors import KdcacheError
from kdcache.feed.logits import LogitFeed, epoch_views
from kdcache.store.cache import open_store

NAMES = ["logits", "params", "view_hash"]

# A student process: opens a scratch feed, reads epoch 1 and prints a digest of its rows and the bytes it wrote.
CHILD = """
import hashlib, json, sys
from pathlib import Path
from kdcache.feed.logits import LogitFeed, epoch_views
from kdcache.store.cache import open_store

def written():
    return int(next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("wchar:")).split()[1])

store = open_store(sys.argv[1])
feed = LogitFeed(store, ["logits", "params", "view_hash"], scratch=sys.argv[2])
before = written()
rows = feed.get(1, epoch_views(0, 1, store.num_samples, store.num_views, uniform=False))
digest = hashlib.sha256(b"".join(rows[n].tobytes() for n in sorted(rows))).hexdigest()
print(json.dumps({"digest": digest, "wrote": written() - before}), flush=True)
"""

# A student killed while decompressing: its first chunk goes to the temp file, then it waits to be killed.
STALLED = """
import sys, time
import kdcache.feed.logits as feed
from kdcache.store.cache import open_store

blocks = feed._blocks
def stalled(arr):
    it = blocks(arr)
    yield next(it)
    print("writing", flush=True)
    time.sleep(600)
feed._blocks = stalled
store = open_store(sys.argv[1])
f = feed.LogitFeed(store, ["logits"], scratch=sys.argv[2])
f.get(0, feed.epoch_views(0, 0, store.num_samples, store.num_views, uniform=False))
"""


def _dump(out: Path, ckpt: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """A two-view float32 digits cache of 600 samples from the resnet8 test teacher (the ``cache`` fixture's, with
    ``seed`` 0)."""
    ds = build_dataset("digits")
    small = type(ds)("digits", "train", ds.images[:600], ds.labels[:600], 10, ds.norm)
    dump_logits(
        teacher="resnet8",
        checkpoint=str(ckpt),
        dataset="digits",
        augment="cifar",
        views=2,
        out=str(out),
        dtype="float32",
        view_seed=seed,
        overwrite=overwrite,
        progress=False,
        data=small,
    )
    return out


@pytest.fixture
def cache(make_cache) -> Path:
    return make_cache(dataset="digits", samples=600, dtype="float32")


def _epochs(feed: LogitFeed, store, epochs: range) -> list[dict[str, np.ndarray]]:
    n = store.num_samples
    return [feed.get(e, epoch_views(0, e, n, store.num_views, uniform=False)[feed.lo : feed.hi]) for e in epochs]


def _assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name


def _npy(scratch: Path) -> list[Path]:
    return sorted(scratch.glob("*.npy"))


def _run(code: str, *args: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("rows", [None, (100, 450)])
def test_scratch_epochs_equal_private_ones_bit_for_bit(cache, tmp_path, rows):
    store = open_store(cache)
    private = LogitFeed(store, NAMES, rows=rows)
    shared = LogitFeed(store, NAMES, rows=rows, scratch=tmp_path / "scratch")
    assert private.whole and shared.whole and shared.shared is not None
    _assert_same(_epochs(shared, store, range(5)), _epochs(private, store, range(5)))
    assert [p.name for p in _npy(tmp_path / "scratch")] == sorted(p.name for p in shared.shared.values())
    assert not list((tmp_path / "scratch").glob("*.tmp"))
    for name, path in shared.shared.items():  # each file holds the whole array, whatever rows the feed reads
        assert np.array_equal(np.load(path, mmap_mode="r"), np.asarray(store.group[name][...]))
    private.close(), shared.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_concurrent_students_share_one_file_written_once(cache, tmp_path):
    scratch = tmp_path / "scratch"
    size = sum(np.asarray(open_store(cache).group[n][...]).nbytes for n in NAMES)
    first = [_run(CHILD, cache, scratch) for _ in range(2)]  # started together: one decompresses, one waits
    out = [json.loads(p.communicate(timeout=300)[0]) for p in first]
    assert all(p.returncode == 0 for p in first)
    assert out[0]["digest"] == out[1]["digest"]
    assert sorted(o["wrote"] >= size for o in out) == [False, True], out
    files = _npy(scratch)
    assert len(files) == len(NAMES) and not list(scratch.glob("*.tmp"))
    stats = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    again = _run(CHILD, cache, scratch)
    later = json.loads(again.communicate(timeout=300)[0])
    assert later["digest"] == out[0]["digest"] and later["wrote"] < size
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in _npy(scratch)] == stats


def test_a_redumped_cache_maps_a_new_file(cache, tmp_path, teacher_ckpt):
    path, scratch = tmp_path / "c.zarr", tmp_path / "scratch"
    shutil.copytree(cache, path)
    old = LogitFeed(open_store(path), NAMES, scratch=scratch)
    _epochs(old, old.store, range(1))
    _dump(path, teacher_ckpt[10], seed=1, overwrite=True)  # same location, other views
    store = open_store(path)
    new = LogitFeed(store, NAMES, scratch=scratch)
    assert set(new.shared.values()).isdisjoint(old.shared.values())
    _assert_same(_epochs(new, store, range(3)), _epochs(LogitFeed(store, NAMES), store, range(3)))
    assert len(_npy(scratch)) == 2 * len(NAMES)
    old.close(), new.close()


def test_an_interrupted_decompression_leaves_only_a_temp_file_a_later_run_cleans(cache, tmp_path):
    scratch = tmp_path / "scratch"
    stalled = _run(STALLED, cache, scratch)
    assert stalled.stdout.readline().strip() == "writing"
    stalled.send_signal(signal.SIGKILL)
    stalled.wait(timeout=60)
    assert not _npy(scratch) and len(list(scratch.glob("*.tmp"))) == 1
    store = open_store(cache)
    feed = LogitFeed(store, ["logits"], scratch=scratch)
    _assert_same(_epochs(feed, store, range(2)), _epochs(LogitFeed(store, ["logits"]), store, range(2)))
    assert len(_npy(scratch)) == 1 and not list(scratch.glob("*.tmp"))
    feed.close()


def test_a_full_scratch_disk_streams_instead(cache, tmp_path, monkeypatch):
    store = open_store(cache)
    monkeypatch.setattr(
        "kdcache.feed.logits.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000)
    )
    with pytest.warns(UserWarning, match="streaming chunks from the store instead"):
        feed = LogitFeed(store, NAMES, scratch=tmp_path / "scratch")
    assert not feed.whole
    _assert_same(_epochs(feed, store, range(2)), _epochs(LogitFeed(store, NAMES), store, range(2)))
    assert not _npy(tmp_path / "scratch")
    feed.close()


def test_an_unusable_scratch_folder_is_refused_in_one_line(cache, tmp_path):
    store = open_store(cache)
    (tmp_path / "file").write_text("")
    with pytest.raises(KdcacheError, match=r"--cache-scratch .*file is a file: give a folder"):
        LogitFeed(store, NAMES, scratch=tmp_path / "file")
    with pytest.raises(KdcacheError, match=r"--cache-scratch .*file/sub cannot be created \(Not a directory\)"):
        LogitFeed(store, NAMES, scratch=tmp_path / "file" / "sub")


def test_a_read_only_scratch_folder_is_refused(cache, tmp_path, monkeypatch):
    scratch = tmp_path / "ro"
    scratch.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root ignores the mode bits: ask access(2) as a user would
        monkeypatch.setattr("kdcache.feed.logits.os.access", lambda *_: False)
    with pytest.raises(KdcacheError, match=r"--cache-scratch .*ro is not writable: choose a folder you can write to"):
        LogitFeed(open_store(cache), NAMES, scratch=scratch)


def test_a_failed_write_is_one_line_and_leaves_nothing(cache, tmp_path, monkeypatch):
    def full(arr):
        raise OSError(28, "No space left on device")
        yield

    monkeypatch.setattr("kdcache.feed.logits._blocks", full)
    store = open_store(cache)
    feed = LogitFeed(store, ["logits"], scratch=tmp_path / "scratch")
    with pytest.raises(KdcacheError, match=r"--cache-scratch .*scratch: cannot write .* \(No space left on device\)"):
        _epochs(feed, store, range(1))
    assert not _npy(tmp_path / "scratch") and not list((tmp_path / "scratch").glob("*.tmp"))
    feed.close()


def test_a_damaged_shared_file_is_named(cache, tmp_path):
    store = open_store(cache)
    _epochs(LogitFeed(store, ["logits"], scratch=tmp_path / "scratch"), store, range(1))
    (path,) = _npy(tmp_path / "scratch")
    os.truncate(path, path.stat().st_size // 2)
    feed = LogitFeed(store, ["logits"], scratch=tmp_path / "scratch")
    with pytest.raises(KdcacheError, match=rf"{path.name} is damaged .*: delete it and run again"):
        _epochs(feed, store, range(1))
    feed.close()
