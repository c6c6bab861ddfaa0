import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import assert_same_arrays, cli, run_cli, write_cifar100

from kdcache.dataset.datasets import build_dataset
from kdcache.dump.chunks import UNIT_VIEWS
from kdcache.dump.loop import dump_logits, join_pixels
from kdcache.errors import KdcacheError
from kdcache.store.cache import open_store
from kdcache.views.ops import pixel_hash
from kdcache.views.recipes import make_recipe


def _dump_args(root: Path, ckpt: Path, out: Path, *extra: str, views: str = "2") -> list[str]:
    return [
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "cifar100",
        "--data-root",
        str(root),
        "--augment",
        "cifar",
        "--views",
        views,
        "--out",
        str(out),
        *extra,
    ]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][...]) for name in g.array_keys()}


def assert_same_store(a: Path, b: Path) -> None:
    assert_same_arrays(a, b)
    ax, ay = dict(zarr.open_group(str(a)).attrs), dict(zarr.open_group(str(b)).attrs)
    ax.pop("created"), ay.pop("created")
    assert ax == ay


@pytest.mark.slow
def test_same_logits_for_any_batch_size_and_workers(cifar_root, teacher_ckpt, tmp_path):
    outs = []
    for bs, workers in ((1, 0), (7, 2), (64, 0)):
        out = tmp_path / f"b{bs}.zarr"
        dump_logits(
            teacher="resnet8",
            checkpoint=str(teacher_ckpt[100]),
            dataset="cifar100",
            data_root=str(cifar_root),
            augment="mlkd",
            views=2,
            out=str(out),
            batch_size=bs,
            workers=workers,
            dtype="float32",
            progress=False,
        )
        outs.append(out)
    assert_same_store(outs[0], outs[1])
    assert_same_store(outs[0], outs[2])


def test_joined_loader_batches_keep_kinds_and_order():
    import torch

    gen = torch.Generator().manual_seed(0)
    full = torch.randint(0, 256, (2, 11, 3, 4, 4), dtype=torch.uint8, generator=gen)  # weak and strong kinds
    parts = [full[:, :3], full[:, 3:4], full[:, 4:]]  # a batch's remainder is a strided slice
    assert not parts[0].is_contiguous()
    joined = join_pixels(parts, pin=False)
    assert joined.dtype == torch.uint8 and joined.is_contiguous() and torch.equal(joined, full)


def test_views_all_covers_every_crop_flip_once_and_replays(teacher_ckpt, tmp_path):
    ds = build_dataset("digits")
    small = type(ds)("digits", "train", ds.images[:20], ds.labels[:20], 10, ds.norm)
    out = tmp_path / "all.zarr"
    summary = dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[10]),
        dataset="digits",
        augment="cifar",
        views="all",
        out=str(out),
        progress=False,
        data=small,
    )
    assert summary.num_views == 162 and len(summary.teacher_top1) == 162
    store = open_store(out)
    params = np.asarray(store.group["params"][...])  # (162, 20, 3)
    for i in (0, 11, 19):
        assert {tuple(p) for p in params[:, i]} == {(t, lt, f) for t in range(9) for lt in range(9) for f in range(2)}
    recipe = make_recipe("cifar", True)
    hashes = np.asarray(store.group["view_hash"][...])
    for v, i in ((0, 0), (77, 13), (161, 19)):
        assert pixel_hash(recipe.apply(small.image(i), params[v, i])) == int(hashes[v, i])
    assert np.isfinite(np.asarray(store.group["logits"][...], dtype=np.float32)).all()


def test_documented_layout_reads_with_plain_zarr(cifar_root, teacher_ckpt, tmp_path):
    out = tmp_path / "m.zarr"
    run_cli(*_dump_args(cifar_root, teacher_ckpt[100], out, "--augment", "mlkd"), check=True)
    g = zarr.open_group(str(out), mode="r")
    assert g["logits"].shape == (2, 96, 100) and g["logits"].dtype == np.float16
    assert g["logits"].chunks == (1, 4096, 100)
    assert g["logits_strong"].shape == (2, 96, 100)
    assert g["view_hash"].dtype == np.uint64 and g["view_hash"].shape == (2, 96)
    assert list(g["params_strong"].attrs["fields"])[:3] == ["top", "left", "flip"]
    assert np.array_equal(g["labels"][...], np.arange(96) % 100)
    assert g["done"][...].all()
    a = g.attrs
    for key in (
        "kdcache_format",
        "recipe",
        "seed",
        "num_samples",
        "num_classes",
        "dataset",
        "split",
        "teacher",
        "teacher_top1",
        "dtype",
        "versions",
        "created",
    ):
        assert key in a, key
    assert a["teacher"]["name"] == "resnet8" and len(a["teacher"]["checkpoint_sha256"]) == 64
    assert set(a["versions"]) >= {"kdcache", "torch", "torchvision", "zarr"}
    top1 = (np.argmax(g["logits"][1], axis=1) == g["labels"][...]).mean()
    assert a["teacher_top1"][1] == pytest.approx(top1)


def test_mismatch_is_refused_and_nothing_changes(cifar_root, teacher_ckpt, make_cache, tmp_path):
    out = make_cache(copy_to=tmp_path)  # what _dump_args dumps
    before = _arrays(out)
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], out, "--view-seed", "1"))
    assert proc.returncode == 2 and "seed" in proc.stderr and "--overwrite" in proc.stderr
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], out, "--dtype", "float32"))
    assert proc.returncode == 2 and "dtype" in proc.stderr
    after = _arrays(out)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], out, "--view-seed", "1", "--overwrite"))
    assert proc.returncode == 0 and zarr.open_group(str(out)).attrs["seed"] == 1


def test_larger_views_extends_the_cache(cifar_root, teacher_ckpt, make_cache, tmp_path):
    out = make_cache(copy_to=tmp_path)  # 2 views, as _dump_args dumps them
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], out, views="4"), check=True)
    assert "views     4" in proc.stdout
    assert np.array_equal(_arrays(out)["logits"], _arrays(make_cache(views=4))["logits"])


def _writer_processes(parent: int) -> list[int]:
    """Pids of the chunk-writer processes (``kdcache-writer``) whose parent is ``parent``, from Linux's /proc."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("Name", "").strip() == "kdcache-writer" and int(fields.get("PPid", "0")) == parent:
            pids.append(int(status.parent.name))
    return pids


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def _dump_midway(args: list[str], out: Path, **popen) -> subprocess.Popen:
    """Start ``kdcache dump-logits`` with ``args``, stalling halfway, and return once 4 chunks of ``out`` are done."""
    stalled = Path(__file__).with_name("stalled_dump.py")
    proc = subprocess.Popen([sys.executable, str(stalled), *args], stdout=subprocess.DEVNULL, **popen)
    done_dir = out / "done" / "c"
    deadline = time.time() + 600  # a stalled run waits to be stopped: only a hang takes this long
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and sum(1 for _ in done_dir.rglob("*") if _.is_file()) >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the dump ended before it could be interrupted"
    return proc


@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_bit_identical(cifar_root, teacher_ckpt, make_cache, tmp_path):
    args = _dump_args(cifar_root, teacher_ckpt[100], tmp_path / "k.zarr", views="40")
    full = make_cache(views=40)  # what an uninterrupted run of args writes
    proc = _dump_midway(args, tmp_path / "k.zarr", stderr=subprocess.DEVNULL)
    writers = _writer_processes(proc.pid)
    assert writers or sys.platform != "linux", "a local store on Linux is written by a child process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(w) for w in writers):
        time.sleep(0.05)
    assert not any(_running(w) for w in writers), "the killed dump's chunk writer lives on"
    partial = open_store(tmp_path / "k.zarr").done()
    assert 0 < partial.sum() < partial.size
    assert (tmp_path / "k.zarr" / "kdcache.lock").exists()  # left behind by the killed writer, taken over below
    run_cli(*args, check=True)
    assert_same_store(tmp_path / "k.zarr", full)


@pytest.mark.slow
def test_ctrl_c_midway_stops_cleanly_and_resumes(cifar_root, teacher_ckpt, make_cache, tmp_path):
    out, full = tmp_path / "i.zarr", make_cache(views=40)  # what an uninterrupted run of args writes
    args = _dump_args(cifar_root, teacher_ckpt[100], out, "--workers", "2", views="40")
    # Its own process group, so the SIGINT reaches the dump, its loader workers and its writer, as a terminal's Ctrl-C
    # does.
    proc = _dump_midway(args, out, stderr=subprocess.PIPE, text=True, start_new_session=True)
    writers = _writer_processes(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip() == "Aborted!"  # click's abort, no traceback or error from the writer
    assert not (out / "kdcache.lock").exists() and not any(_running(w) for w in writers)
    partial = open_store(out).done()
    assert 0 < partial.sum() < partial.size
    run_cli(*args, check=True)
    assert_same_store(out, full)


def test_second_writer_is_refused(cifar_root, teacher_ckpt, tmp_path):
    out = tmp_path / "l.zarr"
    out.mkdir()
    (out / "kdcache.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], out))
    assert proc.returncode == 2 and "is being written by pid" in proc.stderr


def test_float16_overflow_suggests_float32(cifar_root, tmp_path):
    import torch

    from kdcache.models.checkpoints import save_checkpoint
    from kdcache.models.factory import create_model

    model = create_model("resnet8", 100)
    with torch.no_grad():
        model.fc.bias.fill_(1e5)
    save_checkpoint(tmp_path / "big.pth", model)
    proc = cli(*_dump_args(cifar_root, tmp_path / "big.pth", tmp_path / "o.zarr"))
    assert proc.returncode == 2 and "--dtype float32" in proc.stderr and "sample 0, view 0" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()
    cli(*_dump_args(cifar_root, tmp_path / "big.pth", tmp_path / "o.zarr", "--dtype", "float32"), check=True)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (["--views", "0"], "--views must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--teacher", "resnet9"], "did you mean"),
        (["--teacher", "torchvision.resnet9000", "--checkpoint", ""], "unknown model 'torchvision.resnet9000'"),
        (["--out", "foo://bucket/n.zarr"], "unknown URL scheme foo://"),
    ],
)
def test_nonsense_numbers_and_names(cifar_root, teacher_ckpt, tmp_path, bad, needle):
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], tmp_path / "n.zarr"), *bad)
    assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "n.zarr").exists()


def test_store_inside_another_store_is_refused(cifar_root, teacher_ckpt, make_cache):
    outer = make_cache()  # nothing may be written into it: the session checks it stays as dumped
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], outer / "inner.zarr"))
    assert proc.returncode == 2 and "is inside the cache store" in proc.stderr
    assert not (outer / "inner.zarr").exists()


def test_store_path_that_is_a_file(cifar_root, teacher_ckpt, tmp_path):
    (tmp_path / "f.zarr").write_text("x")
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], tmp_path / "f.zarr"))
    assert proc.returncode == 2 and "is a file" in proc.stderr


def test_inspect_prints_and_plots(make_cache, tmp_path):
    proc = cli("inspect", make_cache(), "--plot", tmp_path / "v.png", check=True)
    assert "complete   2/2 chunks" in proc.stdout and "top-1 per view" in proc.stdout
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(KdcacheError, match="not found"):
        open_store(tmp_path / "missing.zarr")


def test_non_finite_teacher_outputs_name_sample_and_view(cifar_root, tmp_path):
    from kdcache.models.checkpoints import save_checkpoint
    from kdcache.models.factory import create_model

    model = create_model("resnet8", 100)
    model.bn1.running_var[0] = -1.0  # finite weights, NaN activations
    save_checkpoint(tmp_path / "nan.pth", model)
    proc = cli(*_dump_args(cifar_root, tmp_path / "nan.pth", tmp_path / "o.zarr"))
    assert proc.returncode == 2 and "non-finite logits for sample 0, view 0" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_checkpoint_with_other_class_count(cifar_root, teacher_ckpt, tmp_path):
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[10], tmp_path / "o.zarr"))
    assert proc.returncode == 2 and "shape mismatch (fc.weight (10, 64) vs (100, 64)" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "o.zarr").exists()


SMALL = 20  # digits samples of the failure-and-resume dumps: one chunk, as any dataset below CHUNK samples


def _fails_then_resumes(
    make_cache, teacher_ckpt: dict[int, Path], tmp_path: Path, monkeypatch, patch: tuple, match: str
) -> np.ndarray:
    # 40 views of the one-chunk data make three work units (16, 16 and 8 views): a failure in the second unit leaves
    # the first one done.
    """Dump with ``patch`` (object, attribute, replacement) in place: it must fail with ``match``, release the lock, and
    the same call without the patch must resume to the uninterrupted dump's store. Returns the done chunks after the
    failure."""
    ref, out = make_cache(dataset="digits", samples=SMALL, views=40), tmp_path / "failed.zarr"
    ds = build_dataset("digits")
    small = type(ds)("digits", "train", ds.images[:SMALL], ds.labels[:SMALL], 10, ds.norm)
    kw = dict(teacher="resnet8", checkpoint=str(teacher_ckpt[10]), dataset="digits", augment="cifar", views=40)
    kw |= dict(data=small, progress=False)
    with monkeypatch.context() as m:
        m.setattr(*patch)
        with pytest.raises(KdcacheError, match=match):
            dump_logits(out=str(out), **kw)
    done = open_store(out).done()
    assert not (out / "kdcache.lock").exists()
    dump_logits(out=str(out), **kw)
    assert_same_store(out, ref)
    return done


def test_full_disk_leaves_a_resumable_store(make_cache, teacher_ckpt, tmp_path, monkeypatch):
    import errno

    import zarr.storage._local as local

    real_put, writes = local._put, {"n": 0}

    def put(path, value, exclusive=False):
        if "logits" in str(path) and "/c/" in str(path):
            writes["n"] += 1
            if writes["n"] > 20:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    done = _fails_then_resumes(
        make_cache,
        teacher_ckpt,
        tmp_path,
        monkeypatch,
        (local, "_put", put),
        "No space left on device.*re-run the same command to resume",
    )
    assert done.sum() == UNIT_VIEWS


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="local stores are written by a child process on Linux only")
def test_writer_process_death_is_an_error_and_the_store_resumes(make_cache, teacher_ckpt, tmp_path, monkeypatch):
    from kdcache.dump import chunks

    real_write, calls = chunks.write_chunk, {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1  # counted in the writer process, which the patch reaches through fork
        if calls["n"] == 20:
            os._exit(3)
        return real_write(*args, **kwargs)

    done = _fails_then_resumes(
        make_cache,
        teacher_ckpt,
        tmp_path,
        monkeypatch,
        (chunks, "write_chunk", dies_on_third),
        r"chunk writer process died \(exit code 3\): re-run the same command to resume",
    )
    assert done.sum() == UNIT_VIEWS  # the first unit; the second died before all its chunks were written


def test_unwritable_store_location_is_one_line(cifar_root, teacher_ckpt, tmp_path):
    target = Path("/sys/kdcache-test.zarr")  # sysfs refuses new directories, even to root
    if not Path("/sys").is_dir():
        pytest.skip("needs Linux sysfs")
    proc = cli(*_dump_args(cifar_root, teacher_ckpt[100], target))
    assert proc.returncode == 2 and "choose a writable --out path" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("slow", ["teacher", "views"])
def test_summary_says_which_stage_held_the_loop_back(cifar_root, teacher_ckpt, tmp_path, monkeypatch, slow):
    # The slowed stage sleeps a multiple of the time the loop spent on everything else since that stage last ran,
    # measured as the dump runs, so it holds the loop back however busy the machine is (a fixed delay can be outgrown
    # by a loaded machine's real forward pass or view building).
    import threading

    from kdcache.dump.chunks import ViewSet
    from kdcache.dump.loop import DumpLoop
    from kdcache.teacher.runner import Teacher

    factor, floor = 3.0, 0.01
    clock = {"mark": 0.0, "other": 0.0, "finished": 0, "injected": 0.0, "calls": 0}
    finished = threading.Condition()

    def sleep_for(other: float) -> None:
        delay = floor + factor * other
        clock["injected"] += delay
        clock["calls"] += 1
        time.sleep(delay)

    real_run, real_launch, real_store = DumpLoop.run, DumpLoop.launch, DumpLoop.store_rows

    def run(self, batches):
        clock["mark"] = time.perf_counter()
        return real_run(self, batches)

    if slow == "teacher":  # in the loop's thread: slowed by what the loop did since the last forward pass ended
        real_forward = Teacher.launch

        def launch(self, views):
            sleep_for(time.perf_counter() - clock["mark"])
            try:
                return real_forward(self, views)
            finally:
                clock["mark"] = time.perf_counter()

        monkeypatch.setattr(Teacher, "launch", launch)
    else:  # in the prefetch thread: batch k+1 is built only once the loop has finished batch k, slowed by its time
        real_build = ViewSet.__getitem__

        def loop_launch(self, final):
            if not final:
                clock["mark"] = time.perf_counter()  # the loop has its next batch
            return real_launch(self, final)

        def loop_store(self, depth):
            real_store(self, depth)
            if depth:
                with finished:
                    clock["other"] = time.perf_counter() - clock["mark"]
                    clock["finished"] += 1
                    finished.notify_all()

        def build(self, ks):
            with finished:
                assert finished.wait_for(lambda: clock["finished"] >= clock["calls"], timeout=120)
                other = clock["other"] if clock["calls"] else 0.0
            sleep_for(other)
            return real_build(self, ks)

        monkeypatch.setattr(DumpLoop, "launch", loop_launch)
        monkeypatch.setattr(DumpLoop, "store_rows", loop_store)
        monkeypatch.setattr(ViewSet, "__getitem__", build)
    monkeypatch.setattr(DumpLoop, "run", run)
    s = dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=2,
        out=str(tmp_path / "s.zarr"),
        batch_size=16,
        forward_block=16,
        progress=False,
    )
    assert set(s.stages) == {"views", "teacher", "gpu_wait", "rows", "writer"}
    assert all(v >= 0 for v in s.stages.values()) and sum(s.stages.values()) <= s.seconds
    assert clock["calls"] == 12  # 96 samples x 2 views in batches (and forward blocks) of 16
    # The loop's own accounting holds every injected second in the slowed stage, and that stage is the bound.
    assert s.stages[slow] >= 0.95 * clock["injected"]
    parts = {k: v for k, v in s.stages.items() if k != "gpu_wait"} | {
        "teacher": s.stages["teacher"] + s.stages["gpu_wait"]
    }
    assert max(parts, key=parts.get) == slow, s.stages
    line = next(x for x in s.lines() if x.startswith("loop"))
    assert ("teacher is the bound" if slow == "teacher" else "raise --workers") in line


def test_prefetch_thread_stops_when_the_consumer_stops_early():
    import threading

    from kdcache.dump.loop import _prefetched

    exhausted = threading.Event()

    def items():
        yield from range(3)
        exhausted.set()  # the producer has queued every item and now puts its end marker into a full queue

    batches = _prefetched(items(), depth=2)
    next(batches)
    assert exhausted.wait(timeout=60)
    closer = threading.Thread(target=batches.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "closing the view prefetcher hung"


def _user_data_unchanged(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["label-outside-classes", "empty-split", "seed-beyond-key"])
def test_bad_data_is_refused_before_anything_is_stored(tmp_path, teacher_ckpt, case):
    import pickle

    root = write_cifar100(tmp_path / "data", n_train=0 if case == "empty-split" else 96)
    if case == "label-outside-classes":
        train = root / "cifar-100-python" / "train"
        entry = pickle.loads(train.read_bytes())
        entry["fine_labels"][7] = 100
        train.write_bytes(pickle.dumps(entry))
    before = _user_data_unchanged(root)
    extra = ["--view-seed", str(2**64)] if case == "seed-beyond-key" else []
    proc = cli(*_dump_args(root, teacher_ckpt[100], tmp_path / "o.zarr", *extra))
    needle = {
        "label-outside-classes": "sample 7 has label 100, outside 0..99",
        "empty-split": "holds no images",
        "seed-beyond-key": "--view-seed must be in 0 .. 2**64 - 1",
    }[case]
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.zarr").exists() and _user_data_unchanged(root) == before
