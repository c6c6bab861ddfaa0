"""Sharing a cache: the manifest a dump writes, publish and its card, reading a cache where it lies (a loopback web
server without directory listings, moto's S3), pull (verified, resumable), derive, and every remote failure as one
line with nothing written where it must not be."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import assert_same_arrays, cli, same_weights

from kdcache.errors import KdcacheError
from kdcache.store.card import read_card
from kdcache.store.locations import parse_hub_url
from kdcache.store.manifest import MANIFEST_NAME, Manifest, sha256_file


class Server:
    """``http.server`` over a folder in a thread: no directory listings, GET and HEAD only, bytes counted per file,
    and faults on demand (a file served damaged, connections dropped, a pause per file)."""

    def __init__(self, root: Path):
        self.root = root
        self.sent: Counter[str] = Counter()  # body bytes per path
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.corrupt: dict[str, int] = {}  # path -> how many more responses to damage (-1: always)
        self.drop: dict[str, int] = {}  # path or "*" -> how many more requests to drop (-1: always)
        self.delay = 0.0
        self.lock = threading.Lock()
        self.active = 0  # requests being answered (a killed client's may still be sleeping in a delay)
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.root), **kwargs)

            def log_message(self, *args):
                pass

            def list_directory(self, path):
                self.send_error(404, "no listings here")
                return None

            def _dropped(self) -> bool:
                with server.lock:
                    server.requests.append((self.command, self.path))
                    for key in (self.path, "*"):
                        left = server.drop.get(key, 0)
                        if left:
                            server.drop[key] = left - 1 if left > 0 else -1
                            self.close_connection = True
                            return True
                return False

            def do_GET(self):
                with server.lock:
                    server.active += 1
                try:
                    if self.path.count("/c/") and server.delay:
                        time.sleep(server.delay)
                    if not self._dropped():
                        super().do_GET()
                finally:
                    with server.lock:
                        server.active -= 1

            def do_HEAD(self):
                if not self._dropped():
                    super().do_HEAD()

            def do_PUT(self):
                server.requests.append((self.command, self.path))
                self.send_error(405)

            do_POST = do_DELETE = do_PUT

            def copyfile(self, source, outputfile):
                data = source.read()
                with server.lock:
                    left = server.corrupt.get(self.path, 0)
                    if left:
                        server.corrupt[self.path] = left - 1 if left > 0 else -1
                        data = data[:-1] + bytes([data[-1] ^ 0xFF])
                    server.sent[self.path] += len(data)
                outputfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def chunk_bytes(self) -> int:
        """Body bytes served of array chunk files (``.../c/...``)."""
        return sum(n for p, n in self.sent.items() if "/c/" in p)

    def reset(self) -> None:
        """Zero the counters once the requests of earlier tests are answered, so none is counted in the next."""
        deadline = time.monotonic() + 60
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            self.sent.clear()
            self.requests.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory, make_cache, cifar_data):
    """A published float32 cache of 4 cifar views in a folder served by a loopback web server (no listings)."""
    root = tmp_path_factory.mktemp("www")
    local = make_cache(dtype="float32", views=4)
    cli("publish", local, root / "cache.zarr", check=True)
    server = Server(root)
    yield {"server": server, "url": f"{server.url}/cache.zarr", "local": local, "dir": root / "cache.zarr"}
    server.close()


@pytest.fixture
def server(served):
    """The module's server, its counters and faults reset for this test."""
    s = served["server"]
    s.reset()
    s.corrupt.clear()
    s.drop.clear()
    s.delay = 0.0
    yield s
    s.corrupt.clear()
    s.drop.clear()
    s.delay = 0.0


def _train(cache: str | Path, out: Path, cifar_data: Path, *extra: str, check: bool = True):
    data = ["--dataset", "cifar100", "--data-root", str(cifar_data)]
    args = ["train-student", "--cache", str(cache), "--student", "resnet8", *data, "--epochs", "1", "--out", str(out)]
    return cli(*args, *extra, check=check)


def _one_line(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_a_finished_dump_writes_a_manifest_of_every_file(make_cache):
    store = make_cache(dtype="float32", views=4)
    manifest = Manifest.from_bytes((store / MANIFEST_NAME).read_bytes(), "test")
    files = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest.files) == files and "logits/c/3/0/0" in files
    for key, entry in manifest.files.items():
        assert entry.size == (store / key).stat().st_size and entry.sha256 == sha256_file(store / key)
    report = cli("verify", store, check=True)
    assert f"{len(files)} files hashed against the manifest (0 differ)" in report.stdout


def test_train_from_a_web_server_is_bit_identical_and_a_second_run_fetches_nothing(
    tmp_path, served, server, cifar_data, remote_cache_dir
):
    before = _digest(served["dir"])
    cache_dir = tmp_path / "cache-dir"
    _train(served["local"], tmp_path / "local", cifar_data)
    _train(served["url"], tmp_path / "remote", cifar_data, "--cache-dir", cache_dir)
    assert same_weights(tmp_path / "local" / "last.pt", tmp_path / "remote" / "last.pt")
    first = server.chunk_bytes()
    assert first > 0 and any(cache_dir.rglob("blobs/*/*"))
    server.reset()
    _train(served["url"], tmp_path / "again", cifar_data, "--cache-dir", cache_dir)
    assert same_weights(tmp_path / "local" / "last.pt", tmp_path / "again" / "last.pt")
    assert sum(server.sent.values()) == 0, server.sent  # the manifest answered by a HEAD, every file from disk
    server.reset()
    report = cli("verify", served["url"], "--cache-dir", cache_dir, check=True)
    assert "clean" in report.stdout and "checked against the manifest" in report.stdout
    assert {m for m, _ in server.requests} <= {"GET", "HEAD"}
    assert _digest(served["dir"]) == before  # nothing written where the cache lies


def test_a_student_fetches_only_the_views_it_draws(tmp_path, served, cifar_data):
    own = Server(served["dir"].parent)  # a server of its own: no other test's late request is counted here
    try:
        per_view = sum(e.size for k, e in _manifest(served["dir"]).files.items() if "/c/1/" in k and "done" not in k)
        url = f"{own.url}/cache.zarr"
        _train(url, tmp_path / "two", cifar_data, "--cache-views", "2", "--cache-dir", tmp_path / "cd")
        fetched = {int(p.split("/")[4]) for p in own.sent if "/c/" in p and "labels" not in p}
        assert fetched <= {0, 1}, sorted(own.sent)  # views 2 and 3 are never fetched
        assert own.chunk_bytes() <= 2 * per_view + 4096
    finally:
        own.close()


def _manifest(store: Path) -> Manifest:
    return Manifest.from_bytes((store / MANIFEST_NAME).read_bytes(), str(store))


def test_inspect_a_url_shows_the_card_from_metadata_alone(tmp_path, served, server):
    shown = cli("inspect", served["url"], "--cache-dir", tmp_path / "cd", check=True).stdout
    for words in ("teacher    resnet8", "views 4", "complete   4/4 chunks", "manifest   ", "card       README.md"):
        assert words in shown, shown
    assert f"kdcache train-student --cache {served['url']}" in shown
    assert server.chunk_bytes() == 0  # no chunk read: attributes, array metadata, manifest and card only


def test_publish_writes_a_card_in_the_dataset_card_form(tmp_path, make_cache, teacher_ckpt, cifar_data):
    store = make_cache(dtype="float32", views=4)
    out = tmp_path / "pub" / "cache.zarr"
    r = cli("publish", store, out, "--checkpoint", teacher_ckpt[100], "--data-root", cifar_data, check=True)
    assert "published" in r.stdout
    text = (out / "README.md").read_text()
    card = read_card(text)
    assert card["license"] == "unknown" and "image-classification" in card["task_categories"]
    facts = card["kdcache"]
    assert facts["teacher"]["checkpoint_sha256"] == hashlib.sha256(teacher_ckpt[100].read_bytes()).hexdigest()
    assert 0 <= facts["teacher"]["test_top1"] <= 100 and facts["views"] == 4 and facts["format"] == "full"
    assert facts["dataset"]["fingerprint"] and facts["dtype"] == "float32" and facts["size_bytes"] > 0
    assert "kdcache dump-logits --teacher resnet8" in facts["made_with"] and "## Train a student from it" in text
    assert "kdcache train-student --cache URL" in text
    manifest = _manifest(out)
    assert manifest.files["README.md"].sha256 == sha256_file(out / "README.md")
    assert "clean" in cli("verify", out, check=True).stdout
    edited = text.replace("license: unknown", "license: cc-by-4.0", 1)
    (out / "README.md").write_text(edited)
    cli("publish", store, out, check=True)  # again: nothing copied, the licence and test top-1 kept
    again = read_card((out / "README.md").read_text())
    assert again["license"] == "cc-by-4.0" and again["kdcache"]["teacher"]["test_top1"] == facts["teacher"]["test_top1"]
    wrong = cli("publish", store, tmp_path / "other", "--checkpoint", teacher_ckpt[10], "--data-root", cifar_data)
    _one_line(wrong, "not the checkpoint this cache was made with")


def test_pull_copies_verifies_and_mends_a_damaged_copy(tmp_path, served, server):
    out = tmp_path / "copy.zarr"
    first = cli("pull", served["url"], out, check=True)
    assert "pulled" in first.stdout
    assert_same_arrays(out, served["local"])
    assert _digest(out) == _digest(served["dir"])  # a whole pull is the published folder, file for file
    assert "clean" in cli("verify", out, check=True).stdout
    chunk, short = out / "logits" / "c" / "1" / "0" / "0", out / "params" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    short.write_bytes(short.read_bytes()[:10])
    assert cli("verify", out).returncode == 1
    server.reset()
    again = cli("pull", served["url"], out, check=True)
    assert "(2 files)" in again.stdout.split("fetched")[1].split(",")[0] or "fetched (2 files)" in again.stdout
    assert set(p for p in server.sent if "/c/" in p) == {"/cache.zarr/logits/c/1/0/0", "/cache.zarr/params/c/2/0/0"}
    assert "clean" in cli("verify", out, check=True).stdout


def test_pull_some_views_and_one_kind_of_an_mlkd_cache(tmp_path, make_cache, cifar_data, teacher_ckpt):
    source = make_cache(augment="mlkd", views=4, dtype="float32")
    out = tmp_path / "weak.zarr"
    r = cli("pull", source, out, "--views", "1:3", "--kind", "weak", check=True)
    assert "views 1:3, weak" in r.stdout
    a, b = zarr.open_group(str(source), mode="r"), zarr.open_group(str(out), mode="r")
    assert "logits_strong" not in b and b["logits"].shape[0] == 2
    for name in ("logits", "params", "view_hash"):
        assert np.array_equal(a[name][1:3], b[name][...]), name
    attrs = dict(b.attrs)
    assert attrs["derived_from"]["views"] == [1, 3] and attrs["view_kinds"] == ["weak"]
    assert attrs["teacher_top1"] == dict(a.attrs)["teacher_top1"][1:3]
    assert "clean" in cli("verify", out, check=True).stdout
    _train(out, tmp_path / "kd", cifar_data, "--loss", "kd")
    _one_line(_train(out, tmp_path / "mlkd", cifar_data, "--loss", "mlkd", check=False), "--kind both")
    both = cli("pull", source, out, "--views", "1:3", check=True)  # the same folder: the strong views added
    assert "fetched (6 files)" in both.stdout  # the strong arrays of 2 views; the weak ones were there
    assert "logits_strong" in zarr.open_group(str(out), mode="r")
    assert "clean" in cli("verify", out, check=True).stdout
    strong = tmp_path / "strong.zarr"
    cli("pull", source, strong, "--kind", "strong", check=True)
    _one_line(_train(strong, tmp_path / "s", cifar_data, check=False), "strong views only")
    _one_line(cli("pull", source, tmp_path / "x", "--views", "3:9"), "--views 3:9", "0 <= A < B <= 4")
    dump = ["dump-logits", "--teacher", "resnet8", "--checkpoint", teacher_ckpt[100], "--dataset", "cifar100"]
    dump += ["--data-root", cifar_data, "--augment", "mlkd", "--views", "4", "--dtype", "float32", "--out", out]
    _one_line(cli(*dump), "derived_from")


def test_derived_top_k_equals_the_dumped_top_k_bit_for_bit(tmp_path, make_cache):
    full = make_cache(dtype="float32", views=4)
    dumped = make_cache(format="topk:5", views=4)  # float16 values, float32 statistics
    out = tmp_path / "topk.zarr"
    r = cli("derive", full, out, "--format", "topk:5", "--dtype", "float16", check=True)
    assert "format topk:5, dtype float16" in r.stdout
    assert_same_arrays(dumped, out)
    for key in _manifest(dumped).files:
        if "/c/" in key:
            assert (out / key).read_bytes() == (dumped / key).read_bytes(), key  # the very chunk files
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["derived_from"]["location"] == str(full) and attrs["derived_from"]["format"] == "full"
    assert attrs["teacher_top1"] == dict(zarr.open_group(str(dumped), mode="r").attrs)["teacher_top1"]
    assert "clean" in cli("verify", out, check=True).stdout and (out / "README.md").is_file()
    views = tmp_path / "views.zarr"
    cli("derive", full, views, "--views", "2:4", check=True)
    a, b = zarr.open_group(str(full), mode="r"), zarr.open_group(str(views), mode="r")
    for name in ("logits", "params", "view_hash"):
        assert np.array_equal(a[name][2:4], b[name][...]), name
    half = tmp_path / "half.zarr"
    cli("derive", full, half, "--dtype", "float16", check=True)
    assert_same_arrays(half, make_cache(views=4))  # as a float16 dump stores them
    _one_line(cli("derive", half, tmp_path / "up", "--dtype", "float32"), "cannot give float32")
    _one_line(cli("derive", dumped, tmp_path / "f", "--format", "full"), "derive another format from a full-logit")
    _one_line(cli("derive", full, tmp_path / "n"), "nothing to derive")
    _one_line(cli("derive", full, views, "--views", "0:1"), "already holds a cache")
    assert not (tmp_path / "up").exists() and not (tmp_path / "n").exists()


def test_a_corrupt_file_on_the_server_is_named_refused_and_never_kept(tmp_path, served, server, cifar_data):
    path = "/cache.zarr/logits/c/2/0/0"
    server.corrupt[path] = -1
    cd = tmp_path / "cd"
    line = _one_line(
        _train(served["url"], tmp_path / "t", cifar_data, "--cache-dir", cd, "--epochs", "4", check=False),
        "array logits, view 2, chunk 0",
        "does not match its manifest",
    )
    assert "publish it again" in line
    entry = _manifest(served["dir"]).files["logits/c/2/0/0"]
    assert not (cd / "blobs" / entry.sha256[:2] / entry.sha256).exists()
    report = cli("verify", served["url"], "--cache-dir", cd)
    assert report.returncode == 1 and "corrupt: " in report.stdout and "view 2, chunk 0" in report.stdout
    _one_line(cli("pull", served["url"], tmp_path / "p"), "array logits, view 2, chunk 0")
    assert not (tmp_path / "p" / "zarr.json").exists()
    server.corrupt[path] = 1  # damaged once (a flaky proxy): fetched again, then fine
    cli("pull", served["url"], tmp_path / "p", check=True)
    assert "clean" in cli("verify", tmp_path / "p", check=True).stdout


def test_dropped_connections_are_retried_then_one_line(tmp_path, served, server, cifar_data):
    server.drop["/cache.zarr/logits/c/0/0/0"] = 2
    server.drop["/cache.zarr/manifest.json"] = 1
    cli("pull", served["url"], tmp_path / "p", check=True)
    assert "clean" in cli("verify", tmp_path / "p", check=True).stdout
    server.drop["*"] = -1
    start = time.monotonic()
    _one_line(cli("pull", served["url"], tmp_path / "q"), "failed 4 times", "check the connection")
    _one_line(_train(served["url"], tmp_path / "t", cifar_data, "--cache-dir", tmp_path / "cd", check=False), "4 times")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "q" / "zarr.json").exists() and not (tmp_path / "t").exists()


def test_remote_failures_are_one_line(tmp_path, served, server, cifar_data, monkeypatch):
    _one_line(cli("inspect", f"{server.url}/nothing.zarr"), "has no manifest.json", "kdcache publish")
    gone = served["dir"] / "view_hash" / "c" / "3" / "0"
    hidden = gone.with_name("moved")
    gone.rename(hidden)  # listed in the manifest, 404 on the server
    try:
        report = cli("pull", served["url"], tmp_path / "p404")
        _one_line(report, "view_hash/c/3/0 (array view_hash, view 3, chunk 0)", "not on the server")
    finally:
        hidden.rename(gone)
    assert not (tmp_path / "p404" / "zarr.json").exists()
    _one_line(_train(f"{server.url}/nothing.zarr", tmp_path / "t", cifar_data, check=False), "has no manifest.json")
    assert not (tmp_path / "t").exists()
    dump = ["dump-logits", "--teacher", "resnet8", "--dataset", "digits", "--augment", "cifar", "--views", "1"]
    _one_line(cli(*dump, "--out", f"{server.url}/new.zarr"), "read-only")
    _one_line(cli("publish", served["local"], f"{server.url}/pub.zarr"), "read-only")
    _one_line(cli("derive", served["local"], f"{server.url}/d.zarr", "--views", "0:1"), "read-only")
    _one_line(cli("pull", served["url"], f"{server.url}/p.zarr"), "read-only")
    (tmp_path / "file").write_text("x")
    _one_line(cli("inspect", served["url"], "--cache-dir", tmp_path / "file"), "--cache-dir", "is a file")
    _one_line(cli("pull", served["url"], tmp_path / "file"), "is a file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _one_line(cli("pull", served["url"], tmp_path / "busy"), "not empty")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert {m for m, _ in server.requests} <= {"GET", "HEAD"}
    for module, url, extra in (
        ("aiohttp", served["url"], "kdcache[http]"),
        ("s3fs", "s3://bucket/c.zarr", "kdcache[s3]"),
        ("huggingface_hub", "hf://datasets/org/name/c.zarr", "kdcache[hub]"),
    ):
        monkeypatch.setitem(sys.modules, module, None)
        _one_line(cli("inspect", url), extra, f"pip install '{extra}'")
        _one_line(_train(url, tmp_path / "m", cifar_data, check=False), extra)
        monkeypatch.delitem(sys.modules, module)


def test_hub_urls_are_parsed_and_checked():
    hub = parse_hub_url("hf://datasets/org/name@v1.0/caches/resnet32x4.zarr")
    assert (hub.repo_id, hub.revision, hub.path) == ("org/name", "v1.0", "caches/resnet32x4.zarr")
    assert parse_hub_url("hf://datasets/org/name").path == ""
    for bad in ("hf://org/name/c.zarr", "hf://datasets/org", "hf://datasets/org/name@/c.zarr"):
        with pytest.raises(KdcacheError, match="hf://datasets/ORG/NAME|revision"):
            parse_hub_url(bad)
    r = cli("inspect", "hf://org/name/c.zarr")
    _one_line(r, "dataset repository")
    offline = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "inspect", "hf://datasets/org/name/c.zarr"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )
    _one_line(offline, "hf://datasets/org/name/c.zarr", "offline")  # no Hub here: one line, no traceback


def test_a_read_only_local_store_is_never_written(tmp_path, make_cache, cifar_data):
    store = make_cache(dtype="float32", views=4, copy_to=tmp_path)
    before = _digest(store)
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for p in [store, *store.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        _train(store, tmp_path / "run", cifar_data)
        assert "clean" in cli("verify", store, check=True).stdout
        cli("inspect", store, check=True)
        cli("pull", store, tmp_path / "copy.zarr", check=True)
        if os.geteuid() != 0:  # root writes anywhere: the digest below still shows nothing was written
            _one_line(cli("publish", store, store), "read-only")
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert _digest(store) == before


@pytest.mark.slow
def test_a_killed_pull_resumes_and_its_copy_verifies(tmp_path, served, server):
    server.delay = 0.15
    out = tmp_path / "copy.zarr"
    cmd = [sys.executable, "-m", "kdcache.cli", "pull", served["url"], str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len([p for p in out.rglob("*") if p.is_file() and "/c/" in str(p)]) < 6:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST_NAME).exists() and (out / ".kdcache-pull.json").exists()
    kept = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    server.reset()
    server.delay = 0.0
    again = cli("pull", served["url"], out, check=True)
    assert f"({len(kept & set(_manifest(served['dir']).files))} files)" in again.stdout.split("fetched")[1]
    refetched = {p.removeprefix("/cache.zarr/") for p in server.sent}
    assert not (refetched & kept - {"zarr.json"}), refetched & kept
    assert "clean" in cli("verify", out, check=True).stdout
    assert _digest(out) == _digest(served["dir"])


@pytest.mark.slow
def test_a_sweep_of_four_students_fetches_about_one_students_bytes(tmp_path, served, server, cifar_data):
    student = {"dataset": "cifar100", "data-root": str(cifar_data), "student": "resnet8", "batch-size": 64}
    one = tmp_path / "one.yaml"
    one.write_text(json.dumps({**student, "cache": served["url"], "epochs": 4, "seeds": [0]}))  # every view once
    four = tmp_path / "four.yaml"
    four.write_text(json.dumps({**student, "cache": served["url"], "epochs": 4, "seeds": [0, 1, 2, 3]}))
    run = [sys.executable, "-m", "kdcache.cli", "sweep"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [*run, str(one), "--out", str(tmp_path / "o1"), "--cache-dir", str(tmp_path / "c1")],
        check=True,
        env=env,
        capture_output=True,
    )
    single = sum(server.sent.values())
    server.reset()
    proc = subprocess.run(
        [*run, str(four), "--out", str(tmp_path / "o4"), "--cache-dir", str(tmp_path / "c4"), "--parallel", "2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(server.sent.values()) <= 1.1 * single, (sum(server.sent.values()), single)


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 server on localhost with one bucket, as tests/test_scale.py runs it."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="kdcache-share")
    yield env, client
    server.stop()


@pytest.mark.slow
def test_publish_to_s3_then_train_and_pull_from_it(tmp_path, make_cache, cifar_data, s3_env, monkeypatch):
    env, client = s3_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    local = make_cache(dtype="float32", views=4)
    url = "s3://kdcache-share/cache.zarr"
    cli("publish", local, url, check=True)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="kdcache-share")["Contents"]}
    _train(local, tmp_path / "local", cifar_data)
    _train(url, tmp_path / "s3", cifar_data, "--cache-dir", tmp_path / "cd")
    assert same_weights(tmp_path / "local" / "last.pt", tmp_path / "s3" / "last.pt")
    cli("pull", url, tmp_path / "copy.zarr", check=True)
    assert_same_arrays(tmp_path / "copy.zarr", local)
    assert "clean" in cli("verify", url, "--cache-dir", tmp_path / "cd", check=True).stdout
    after = {o["Key"] for o in client.list_objects_v2(Bucket="kdcache-share")["Contents"]}
    assert after == keys and "cache.zarr/manifest.json" in keys  # readers wrote nothing there
