"""The refusal battery: bad input and faults, per command and per class of failure.

Every case runs the real CLI in-process (click's runner) and asserts what a
user must see: exit code 2, exactly one ``error:`` line on stderr naming the
cause, no traceback, and every file of the user's data and caches byte-identical
afterwards (nothing written where it must not go). The classes:

* ``traceback``: input that used to escape as a traceback (damaged stores,
  a worker's decode error, unwritable folders);
* ``bad-data``: data that must be refused, not used;
* ``hole``: a cache with a lost chunk, refused before anything trusts it;
* ``message``: the message names the setting with both values, and the fix;
* ``outputs``: an output location that is a user's file or folder or lies in a cache store.

``verify`` reports what it finds with exit code 1 (its contract), so its hole
case is its own test below; it writes nothing, so it has no ``outputs`` case.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import write_cifar100

from kdcache.cli import main
from kdcache.dataset.datasets import FolderDataset, build_dataset
from kdcache.dump.loop import dump_logits
from kdcache.errors import KdcacheError
from kdcache.settings import check_options
from kdcache.store.verify import verify_cache

UNWRITABLE = "/proc/kdcache-refusals"  # procfs refuses new entries, even to root


@dataclass
class Ctx:
    """One case's folders and the module's shared inputs."""

    data: Path  # the user's data and caches of this case: hashed before and after
    outs: Path  # where outputs may go: not hashed
    cache: Path  # the module's digits cache (2 seeded views): hashed too
    ckpt: dict[int, Path]
    #: Python run before the CLI, in a process of its own (for a case that patches kdcache and starts workers)
    prelude: str | None = None

    def copy(self, edit=None) -> Path:
        """A copy of the module cache under ``data``, optionally changed by ``edit(path)``."""
        path = self.data / "copy.zarr"
        shutil.copytree(self.cache, path)
        if edit is not None:
            edit(path)
        return path


@pytest.fixture
def cache(make_cache) -> Path:
    """The session's digits cache of 2 seeded cifar views (what :func:`dump` dumps)."""
    return make_cache(dataset="digits")


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``: any change, new file or removal shows."""
    files = [p for root in roots for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def invoke(args: list, prelude: str | None = None) -> Outcome:
    """The CLI run as a user would run it (warnings off, as in ``helpers.run_cli``): in-process, or after
    ``prelude`` in a process of its own."""
    args = [str(a) for a in args]
    if prelude is not None:
        code = f"{prelude}\nfrom kdcache.cli import main\nmain()"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
        return Outcome(proc.returncode, proc.stdout, proc.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(*result.exc_info)))  # the user would see this
    return Outcome(result.exit_code, result.stdout, result.stderr)


def assert_refused(result: Outcome, needle: str) -> None:
    """Exit code 2, one ``error:`` line on stderr holding ``needle``, and no traceback anywhere."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# -- building blocks -------------------------------------------------------------------------------------------------


def edit_attrs(**changes):
    """An edit of a store's root attributes: a value replaces, None removes."""

    def edit(path: Path) -> None:
        meta = json.loads((path / "zarr.json").read_text())
        for key, value in changes.items():
            meta["attributes"].pop(key) if value is None else meta["attributes"].update({key: value})
        (path / "zarr.json").write_text(json.dumps(meta))

    return edit


def lose_chunk(path: Path) -> None:
    (path / "logits" / "c" / "1" / "0" / "0").unlink()


def flip_byte(path: Path) -> None:
    chunk = path / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01
    chunk.write_bytes(bytes(data))


def image_folder(root: Path, count: int = 70) -> FolderDataset:
    """An ImageFolder of ``count`` tiny PNGs in 10 classes: more than the 64 images a fingerprint decodes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        d = root / f"class_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return build_dataset("folder", root)


def outside_fingerprint(ds: FolderDataset) -> str:
    """A file the dataset fingerprint does not decode (so only the pre-check or the loader meets it)."""
    n = len(ds)
    sampled = {int(round(x)) for x in np.linspace(0, n - 1, min(n, 64))}
    return ds.paths[next(i for i in range(n) if i not in sampled)]


def truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def folder_dump(ctx: Ctx, *extra) -> list:
    """dump-logits of the image folder under ``data/images`` (no augmentation) into ``outs``."""
    folder = ["--dataset", "folder", "--data-root", ctx.data / "images", "--augment", "none", "--views", "1"]
    return dump(ctx, ctx.outs / "o.zarr", *folder, *extra)


def dump(ctx: Ctx, out, *extra) -> list:
    """dump-logits of the digits cache's settings into ``out``; a flag in ``extra`` overrides (click keeps the last)."""
    base = ["dump-logits", "--teacher", "resnet8", "--dataset", "digits", "--augment", "cifar", "--views", "2"]
    return [*base, "--checkpoint", ctx.ckpt[10], "--out", out, *extra]


def train(ctx: Ctx, cache, out, *extra) -> list:
    base = ["train-student", "--student", "resnet8", "--dataset", "digits", "--epochs", "1", "--batch-size", "256"]
    return [*base, "--cache", cache, "--out", out, *extra]


def study(ctx: Ctx, cache, out, *extra) -> list:
    base = ["study", "views", "--student", "resnet8", "--dataset", "digits", "--epochs", "1", "--batch-size", "256"]
    return [*base, "--cache", cache, "--out", out, *extra]


# -- the cases: each returns (args, what the error line must say) ----------------------------------------------------

CASES = []


def case(command: str, klass: str):
    def register(fn):
        CASES.append(pytest.param(fn, id=f"{command}-{klass}-{fn.__name__}"))
        return fn

    return register


@case("dump-logits", "traceback")
def worker_decode_error(ctx: Ctx):
    ds = image_folder(ctx.data / "images")
    bad = outside_fingerprint(ds)
    truncate(bad)
    # The file breaks after the pre-check; a process of its own, as torch's workers of a failed loader take ~10 s
    # to shut down when garbage-collected inside pytest (a CLI process exits at once).
    ctx.prelude = (
        "from kdcache.dataset.datasets import FolderDataset\n"
        "FolderDataset.check_images = lambda self, samples=None: None"
    )
    args = folder_dump(ctx, "--workers", "2", "--batch-size", "8", "--forward-block", "8")
    return args, f"cannot decode image {bad} (image file is truncated)"


@case("dump-logits", "traceback")
def resume_store_without_recipe(ctx: Ctx):
    return dump(ctx, ctx.copy(edit_attrs(recipe=None))), "attribute 'recipe' is missing"


@case("dump-logits", "bad-data")
def label_outside_classes(ctx: Ctx):
    import pickle

    root = write_cifar100(ctx.data / "cifar")
    train_file = root / "cifar-100-python" / "train"
    entry = pickle.loads(train_file.read_bytes())
    entry["fine_labels"][7] = 100
    train_file.write_bytes(pickle.dumps(entry))
    args = dump(ctx, ctx.outs / "o.zarr", "--dataset", "cifar100", "--data-root", root, "--checkpoint", ctx.ckpt[100])
    return args, "sample 7 has label 100, outside 0..99"


@case("dump-logits", "bad-data")
def undecodable_image(ctx: Ctx):
    ds = image_folder(ctx.data / "images")
    truncate(ds.paths[3])
    return folder_dump(ctx), f"cannot decode image {ds.paths[3]} (image file is truncated): remove or replace it"


@case("dump-logits", "bad-data")
def seed_beyond_generator(ctx: Ctx):
    return dump(
        ctx, ctx.outs / "o.zarr", "--view-seed", str(2**64)
    ), f"--view-seed must be in 0 .. 2**64 - 1, got {2**64}"


@case("dump-logits", "hole")
def resume_store_with_lost_chunk(ctx: Ctx):
    return dump(ctx, ctx.copy(lose_chunk)), "array logits, view 1, chunk 0 has no data although marked done"


@case("dump-logits", "message")
def resume_with_other_seed(ctx: Ctx):
    return dump(ctx, ctx.copy(), "--view-seed", "1"), "seed (store has 0, this run 1); use the same settings to resume"


@case("dump-logits", "outputs")
def dump_out_is_a_users_file(ctx: Ctx):
    (ctx.data / "notes.txt").write_text("mine")
    return dump(ctx, ctx.data / "notes.txt"), "is a file"


@case("dump-logits", "outputs")
def dump_out_is_a_users_folder(ctx: Ctx):
    (ctx.data / "mine").mkdir()
    (ctx.data / "mine" / "notes.txt").write_text("mine")
    return dump(ctx, ctx.data / "mine"), "is a non-empty directory that is not a kdcache store"


@case("dump-logits", "outputs")
def dump_out_inside_a_cache(ctx: Ctx):
    return dump(ctx, ctx.cache / "inner.zarr"), "is inside the cache store"


@case("train-student", "traceback")
def train_cache_without_recipe(ctx: Ctx):
    return train(ctx, ctx.copy(edit_attrs(recipe=None)), ctx.outs / "run"), "recipe"


@case("train-student", "traceback")
def train_out_unwritable(ctx: Ctx):
    return train(ctx, ctx.cache, f"{UNWRITABLE}/run"), f"--out {UNWRITABLE}/run"


@case("train-student", "bad-data")
def non_finite_teacher_rows(ctx: Ctx):
    def nan_rows(path: Path) -> None:
        zarr.open_group(str(path), mode="r+")["logits"][:, 5, 3] = np.nan

    return train(ctx, ctx.copy(nan_rows), ctx.outs / "run"), "logits of sample 5, view"


@case("train-student", "hole")
def train_cache_with_lost_chunk(ctx: Ctx):
    return (
        train(ctx, ctx.copy(lose_chunk), ctx.outs / "run"),
        "array logits, view 1, chunk 0 has no data although marked done",
    )


@case("train-student", "message")
def cache_views_beyond_the_cache(ctx: Ctx):
    return (
        train(ctx, ctx.cache, ctx.outs / "run", "--cache-views", "5"),
        "--cache-views 5 is out of range: the cache holds 2 views per sample",
    )


@case("train-student", "outputs")
def train_out_is_a_users_file(ctx: Ctx):
    (ctx.data / "notes.txt").write_text("mine")
    return train(ctx, ctx.cache, ctx.data / "notes.txt"), "is a file"


@case("train-student", "outputs")
def train_out_inside_a_cache(ctx: Ctx):
    return train(ctx, ctx.cache, ctx.cache / "run"), "is inside the cache store"


@case("inspect", "traceback")
def inspect_store_without_teacher(ctx: Ctx):
    return ["inspect", ctx.copy(edit_attrs(teacher=None))], "attribute 'teacher' is missing"


@case("inspect", "bad-data")
def inspect_corrupt_chunk(ctx: Ctx):
    return ["inspect", ctx.copy(flip_byte)], "array logits, view 1, chunk 0 is corrupt"


@case("inspect", "hole")
def inspect_lost_chunk(ctx: Ctx):
    return ["inspect", ctx.copy(lose_chunk)], "array logits, view 1, chunk 0 has no data although marked done"


@case("inspect", "message")
def compare_caches_of_other_views(ctx: Ctx):
    return ["inspect", ctx.cache, ctx.copy(edit_attrs(seed=1))], "do not hold the same views (seed differs (0 vs 1))"


@case("inspect", "outputs")
def plot_unwritable(ctx: Ctx):
    return ["inspect", ctx.cache, "--plot", f"{UNWRITABLE}/views.png"], "cannot write the plot"


@case("inspect", "outputs")
def plot_inside_a_cache(ctx: Ctx):
    copy = ctx.copy()
    return ["inspect", copy, "--plot", copy / "views.png"], "is inside the cache store"


@case("verify", "traceback")
def replay_with_other_class_count(ctx: Ctx):
    args = ["verify", ctx.cache, "--teacher", "resnet8", "--checkpoint", ctx.ckpt[100], "--sample", "2"]
    return args, "shape mismatch"


@case("verify", "bad-data")
def verify_a_plain_zarr_group(ctx: Ctx):
    zarr.open_group(str(ctx.data / "plain.zarr"), mode="w").attrs["mine"] = 1
    return ["verify", ctx.data / "plain.zarr"], "is not a kdcache store"


@case("verify", "message")
def sample_without_teacher(ctx: Ctx):
    return ["verify", ctx.cache, "--sample", "2"], "--sample needs --teacher"


@case("verify", "message")
def negative_sample(ctx: Ctx):
    return ["verify", ctx.cache, "--sample", "-1"], "--sample must be 0 or more, got -1"


@case("study-views", "traceback")
def study_cache_without_views_mode(ctx: Ctx):
    return study(ctx, ctx.copy(edit_attrs(views_mode=None)), ctx.outs / "s"), "attribute 'views_mode' is missing"


@case("study-views", "traceback")
def study_out_unwritable(ctx: Ctx):
    return study(ctx, ctx.cache, f"{UNWRITABLE}/s"), "cannot be created"


@case("study-views", "bad-data")
def study_cache_of_all_views(ctx: Ctx):
    return study(ctx, ctx.copy(edit_attrs(views_mode="all")), ctx.outs / "s"), "needs a cache of seeded views"


@case("study-views", "hole")
def study_cache_with_lost_chunk(ctx: Ctx):
    return study(ctx, ctx.copy(lose_chunk), ctx.outs / "s"), "array logits, view 1, chunk 0 has no data"


@case("study-views", "message")
def counts_beyond_the_cache(ctx: Ctx):
    return (
        study(ctx, ctx.cache, ctx.outs / "s", "--counts", "1,3"),
        "--counts must lie in 1..2 (the views the cache holds), got [1, 3]",
    )


@case("study-views", "outputs")
def study_out_inside_a_cache(ctx: Ctx):
    return study(ctx, ctx.cache, ctx.cache / "s"), "is inside the cache store"


@case("study-views", "outputs")
def study_out_holds_a_users_file(ctx: Ctx):
    (ctx.data / "mine").mkdir()
    (ctx.data / "mine" / "notes.txt").write_text("mine")
    return study(ctx, ctx.cache, ctx.data / "mine"), "holds 'notes.txt', which a study does not write"


@case("quickstart", "traceback")
def quickstart_out_unwritable(ctx: Ctx):
    return ["quickstart", "--out", f"{UNWRITABLE}/qs"], f"--out {UNWRITABLE}/qs"


@case("quickstart", "message")
def quickstart_zero_epochs(ctx: Ctx):
    return ["quickstart", "--out", ctx.outs / "qs", "--epochs", "0"], "--epochs must be at least 1, got 0"


@case("quickstart", "outputs")
def quickstart_out_is_a_users_file(ctx: Ctx):
    (ctx.data / "notes.txt").write_text("mine")
    return ["quickstart", "--out", ctx.data / "notes.txt"], "is a file"


@case("quickstart", "outputs")
def quickstart_out_inside_a_cache(ctx: Ctx):
    return ["quickstart", "--out", ctx.cache / "qs"], "is inside the cache store"


def sweep_spec(ctx: Ctx, **extra) -> Path:
    """A user's SPEC file (under data, so it is part of what must stay unchanged)."""
    body = {"cache": str(ctx.cache), "dataset": "digits", "student": "resnet8", "epochs": 1, **extra}
    path = ctx.data / "spec.yaml"
    path.write_text(json.dumps(body))
    return path


@case("sweep", "traceback")
def sweep_out_unwritable(ctx: Ctx):
    return ["sweep", sweep_spec(ctx), "--out", f"{UNWRITABLE}/sw"], f"--out {UNWRITABLE}/sw"


@case("sweep", "bad-data")
def sweep_spec_unknown_option(ctx: Ctx):
    return ["sweep", sweep_spec(ctx, **{"kd-wieght": 9}), "--out", ctx.outs / "sw"], "did you mean kd-weight"


@case("sweep", "hole")
def sweep_cache_with_a_lost_chunk(ctx: Ctx):
    path = sweep_spec(ctx)
    path.write_text(path.read_text().replace(str(ctx.cache), str(ctx.copy(lose_chunk))))
    return ["sweep", path, "--out", ctx.outs / "sw"], "array logits, view 1, chunk 0 has no data"


@case("sweep", "message")
def sweep_seeds_not_integers(ctx: Ctx):
    return ["sweep", sweep_spec(ctx, seeds=[0, "one"]), "--out", ctx.outs / "sw"], "seeds: takes a list"


@case("sweep", "outputs")
def sweep_out_inside_a_cache(ctx: Ctx):
    return ["sweep", sweep_spec(ctx), "--out", ctx.cache / "sw"], "is inside the cache store"


@case("train-student", "bad-data")
def train_config_feature_distiller(ctx: Ctx):
    path = ctx.data / "crd.yaml"
    path.write_text("DISTILLER:\n  TYPE: CRD\n")
    return ["train-student", "--config", path, "--cache", ctx.cache, "--out", ctx.outs / "r"], "CRD"


@case("train-student", "message")
def train_usage_error_is_one_line(ctx: Ctx):
    args = ["train-student", "--cache", ctx.cache, "--student", "resnet8", "--dataset", "digits"]
    return [*args, "--out", ctx.outs / "r", "--batch-size", "abc"], "'abc' is not a valid integer"


@pytest.mark.parametrize("build", CASES)
def test_refused_in_one_line_with_user_data_untouched(build, cache, teacher_ckpt, tmp_path):
    ctx = Ctx(tmp_path / "data", tmp_path / "outs", cache, teacher_ckpt)
    ctx.data.mkdir()
    ctx.outs.mkdir()
    args, needle = build(ctx)
    before = snapshot(ctx.data, cache)
    assert_refused(invoke(args, ctx.prelude), needle)
    assert snapshot(ctx.data, cache) == before


# -- one rule per flag, whichever command takes it -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--seed", str(2**64), f"--seed must be in 0 .. 2**64 - 1, got {2**64}"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--workers", "-1", "--workers must be 0 or more, got -1"),
    ],
)
@pytest.mark.parametrize("command", ["dump-logits", "train-student", "study-views"])
def test_a_flag_is_checked_the_same_way_by_every_command(cache, teacher_ckpt, tmp_path, flag, value, message, command):
    ctx = Ctx(tmp_path, tmp_path, cache, teacher_ckpt)
    build = {"dump-logits": dump, "train-student": train, "study-views": study}[command]
    args = build(ctx, tmp_path / "o.zarr") if command == "dump-logits" else build(ctx, cache, tmp_path / "o")
    if command == "dump-logits" and flag == "--seed":  # a dump's seed is the views' seed
        flag, message = "--view-seed", message.replace("--seed", "--view-seed")
    before = snapshot(cache)
    assert_refused(invoke(args + [flag, value]), message)
    assert snapshot(cache) == before and not (tmp_path / "o.zarr").exists()


def test_verify_names_a_hole_and_skips_the_replay(cache, teacher_ckpt, tmp_path):
    ctx = Ctx(tmp_path, tmp_path, cache, teacher_ckpt)
    copy = ctx.copy(lambda p: (p / "params" / "c" / "1" / "0" / "0").unlink())
    before = snapshot(tmp_path)
    result = invoke(["verify", copy, "--teacher", "resnet8", "--checkpoint", teacher_ckpt[10], "--sample", "3"])
    assert result.exit_code == 1
    assert "PROBLEM   missing: array params, view 1, chunk 0 has no data although marked done" in result.stdout
    assert "replay skipped" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert snapshot(tmp_path) == before


def test_verify_replays_only_finished_chunks(cache, teacher_ckpt, tmp_path):
    def interrupted(path: Path) -> None:  # view 1 was never written, nor the manifest a dump writes on completion
        for name in ("logits/c/1/0/0", "params/c/1/0/0", "view_hash/c/1/0", "manifest.json"):
            (path / name).unlink()
        zarr.open_group(str(path), mode="r+")["done"][1, 0] = 0

    copy = Ctx(tmp_path, tmp_path, cache, teacher_ckpt).copy(interrupted)
    report = verify_cache(str(copy), "resnet8", str(teacher_ckpt[10]), sample=6, device="cpu")
    assert [p.split(" (")[0] for p in report.problems] == ["incomplete: 1 chunks not written"]
    assert "6 random views rebuilt and re-run through resnet8 (max |logit diff| 0)" in report.checked


def test_verify_lists_a_layout_problem_instead_of_crashing(cache, tmp_path):
    ctx = Ctx(tmp_path, tmp_path, cache, {})
    report = verify_cache(str(ctx.copy(edit_attrs(dataset=None))))
    assert report.problems == [
        "layout: attribute 'dataset' is missing (its zarr.json was edited or damaged); restore the store, or dump it "
        "again (--overwrite or a new --out)"
    ]


# -- images at dump time ---------------------------------------------------------------------------------------------


def test_the_image_check_decodes_rather_than_verifies(tmp_path):
    from PIL import Image

    ds = image_folder(tmp_path / "images", count=12)
    jpeg = Path(ds.paths[5]).with_suffix(".jpg")
    Image.open(ds.paths[5]).convert("RGB").resize((64, 48)).save(jpeg, quality=90)
    Path(ds.paths[5]).unlink()
    ds = build_dataset("folder", tmp_path / "images")
    truncate(ds.paths[5])
    with Image.open(ds.paths[5]) as im:
        im.verify()  # PIL's verify() passes a truncated JPEG: only a decode finds it
    truncate(ds.paths[9])
    with pytest.raises(KdcacheError, match=r"cannot decode image .*truncated.*remove or replace it; 1 more fail"):
        ds.check_images()
    ds.check_images([0, 1, 2])  # the samples a resumed dump still decodes


def test_a_resumed_dump_checks_only_the_images_it_will_decode(tmp_path, teacher_ckpt):
    ds = image_folder(tmp_path / "images")
    kw = dict(teacher="resnet8", checkpoint=str(teacher_ckpt[10]), dataset="folder", data_root=str(tmp_path / "images"))
    kw |= dict(augment="imagenet", out=str(tmp_path / "o.zarr"), forward_block=16, batch_size=16, progress=False)
    dump_logits(views=1, **kw)
    bad = outside_fingerprint(ds)
    truncate(bad)
    assert dump_logits(views=1, **kw).notes == ["nothing to do: every chunk of every view was already written"]
    before = snapshot(tmp_path / "o.zarr")
    with pytest.raises(KdcacheError, match=f"cannot decode image {bad}"):
        dump_logits(views=2, **kw)  # the new view decodes every sample
    assert snapshot(tmp_path / "o.zarr") == before


# -- the shared validator, as Python callers meet it -----------------------------------------------------------------


@pytest.mark.parametrize(
    "values,message",
    [
        ({"lr": 0.0}, "--lr must be positive, got 0.0"),
        ({"weight_decay": -1e-4}, "--weight-decay must be 0 or more, got -0.0001"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1), got 1.0"),
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"seed": -1}, "--seed must be in 0 .. 2**64 - 1, got -1"),
        ({"lr_decay_rate": 1.5}, "--lr-decay-rate must be in (0, 1], got 1.5"),
        ({"batch_size": "64"}, "--batch-size must be an integer, got '64'"),
        ({"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
        ({"workers": True}, "--workers must be an integer, got True"),
        ({"temperature": "4"}, "--temperature must be a number, got '4'"),
        ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
        ({"ce_weight": 1, "kd_weight": -1}, "--kd-weight must be 0 or more, got -1"),
    ],
)
def test_check_options_names_the_flag_the_rule_and_the_value(values, message):
    with pytest.raises(KdcacheError) as err:
        check_options(values)
    assert str(err.value) == message


def test_check_options_skips_absent_and_unknown_names():
    check_options({"lr": None, "temperature": 4, "student": "resnet8", "seed": 2**64 - 1, "momentum": 0})


@pytest.mark.parametrize("call", ["dump", "verify"])
def test_library_functions_validate_like_the_cli(call, tmp_path):
    with pytest.raises(KdcacheError, match=r"^--workers must be 0 or more, got -1$|^--sample must be an integer"):
        if call == "dump":
            dump_logits(teacher="resnet8", dataset="digits", augment="cifar", views=1, out=str(tmp_path), workers=-1)
        else:
            verify_cache(str(tmp_path), sample="3")


# -- the new surfaces: the CLI form and the Python form side by side ---------------------------------------------------

LOSS_MODULES = {
    "broken_syntax": "def fn(s, t, y):\n    return (s - t).pow(2).mean(\n",
    "raises_on_import": "raise RuntimeError('no GPU found\\nsecond line')\n",
    "attr_on_import": "import math\nmath.no_such_thing\ndef fn(s, t, y):\n    return s.sum()\n",
    "needs_missing": "import kdcache_not_installed_anywhere\n",
    "loud": "def fn(s, t, y):\n    raise ValueError('labels must be one-hot\\nsee the docs\\nand more')\n",
    "detached": "def fn(s, t, y):\n    return (s.detach() - t).pow(2).mean()\n",
    "scaled": "def fn(s, t, y, *, scale=1.0):\n    return (s * scale - t).pow(2).mean()\n",
}


@pytest.fixture
def loss_modules(tmp_path, monkeypatch) -> Path:
    """The user loss modules above on sys.path (and PYTHONPATH, for the CLI's processes)."""
    folder = tmp_path / "user_losses"
    folder.mkdir()
    for name, code in LOSS_MODULES.items():
        (folder / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return folder


USER_LOSSES = [
    ("broken_syntax:fn", [], "broken_syntax does not import (SyntaxError at"),
    ("raises_on_import:fn", [], "importing raises_on_import raised RuntimeError: no GPU found (+1 more lines"),
    ("attr_on_import:fn", [], "importing attr_on_import raised AttributeError"),
    ("needs_missing:fn", [], "needs 'kdcache_not_installed_anywhere', which is not installed"),
    ("loud:fn", [], "raised ValueError: labels must be one-hot (+2 more lines"),
    ("detached:fn", [], "returned a tensor without gradient"),
    ("scaled:fn", ["--loss-opt", "scale=hot"], "raised TypeError (with --loss-opt scale='hot')"),
    ("scaled:fn", ["--loss-opt", "scale=2", "--loss-opt", "scale=3"], "--loss-opt scale is given twice"),
]


@pytest.mark.parametrize(
    "loss,extra,needle", USER_LOSSES, ids=[f"{x[0]}{'+opts' if x[1] else ''}" for x in USER_LOSSES]
)
def test_user_loss_problems_are_one_line_in_both_forms(
    loss_modules, cache, teacher_ckpt, tmp_path, loss, extra, needle
):
    import kdcache

    ctx = Ctx(tmp_path, tmp_path, cache, teacher_ckpt)
    before = snapshot(cache, loss_modules)
    out = tmp_path / "run"
    assert_refused(invoke(train(ctx, cache, out, "--loss", loss, *extra)), needle)
    assert not out.exists()  # a refused run leaves no folder, lock or file behind
    opts = [x for x in extra if x != "--loss-opt"]
    with pytest.raises(KdcacheError) as raised:
        kdcache.train_student(**_train_kwargs(cache, out), loss=loss, loss_opt=opts)
    assert needle in str(raised.value) and "\n" not in str(raised.value)
    assert not out.exists() and snapshot(cache, loss_modules) == before


def _train_kwargs(cache: Path, out: Path) -> dict:
    return dict(
        student="resnet8", dataset="digits", epochs=1, batch_size=256, cache=str(cache), out=out, progress=False
    )


PYTHON_API = [
    (lambda k: k.register_loss("kd", "again", {})(lambda s, t, y: s.sum()), KdcacheError, "already registered"),
    (lambda k: k.register_loss("mine", "x", [1, 2]), TypeError, "defaults as a mapping"),
    (lambda k: k.register_loss("mine", "x", {})(42), TypeError, "decorates a function"),
    (lambda k: k.Objective.create("kd", temperature=-1.0), KdcacheError, "--temperature must be positive, got -1.0"),
    (lambda k: k.Objective.create("kd", temperature="hot"), KdcacheError, "--temperature must be a number, got 'hot'"),
    (lambda k: k.Objective.create(123), TypeError, "a loss is named by text"),
    (lambda k: k.get_loss("kd:"), KdcacheError, "unknown --loss 'kd:'"),
]


@pytest.mark.parametrize("call,kind,needle", PYTHON_API, ids=range(len(PYTHON_API)))
def test_python_loss_api_applies_the_rules(call, kind, needle):
    import kdcache

    registered = dict(kdcache.LOSS_REGISTRY)
    with pytest.raises(kind) as raised:
        call(kdcache)
    assert needle in str(raised.value) and "\n" not in str(raised.value)
    assert registered == kdcache.LOSS_REGISTRY  # nothing replaced or added


def test_register_loss_replaces_only_when_told():
    import kdcache

    saved = dict(kdcache.LOSS_REGISTRY)
    try:
        kdcache.register_loss("kd", "mine", {"temperature": 1.0}, replace=True)(lambda s, t, y, *, temperature: s.sum())
        assert kdcache.LOSS_REGISTRY["kd"].summary == "mine"
    finally:
        kdcache.LOSS_REGISTRY.clear()
        kdcache.LOSS_REGISTRY.update(saved)


LOADER_ARGS = [
    ({"batch_size": 0}, KdcacheError, "--batch-size must be at least 1, got 0"),
    ({"batch_size": "64"}, KdcacheError, "--batch-size must be an integer, got '64'"),
    ({"batch_size": 32.5}, KdcacheError, "--batch-size must be an integer, got 32.5"),
    ({"seed": -1}, KdcacheError, "--seed must be in 0 .. 2**64 - 1, got -1"),
    ({"cache_memory": "lots"}, KdcacheError, "--cache-memory takes a size such as 512MiB"),
    ({"kinds": 0}, KdcacheError, "kinds is 1 (one view per sample) or 2"),
    ({"view_schedule": "random"}, KdcacheError, "unknown --view-schedule 'random'"),
]


@pytest.mark.parametrize(
    "kwargs,kind,needle", LOADER_ARGS, ids=[next(iter(x[0])) + str(i) for i, x in enumerate(LOADER_ARGS)]
)
def test_distill_loader_applies_the_cli_rules(cache, kwargs, kind, needle):
    import kdcache

    with pytest.raises(kind) as raised:
        kdcache.DistillLoader(str(cache), "digits", **kwargs)
    assert needle in str(raised.value)


def test_distill_loader_reads_sizes_as_the_cli_does(cache):
    import kdcache

    loader = kdcache.DistillLoader(str(cache), "digits", cache_memory="4GiB", batch_size=256)
    try:
        assert next(iter(loader)).views[0].shape[0] == 256
    finally:
        loader.close()


def test_a_scheduler_that_is_no_address_is_refused_before_connecting(cache, teacher_ckpt, tmp_path):
    ctx = Ctx(tmp_path, tmp_path, cache, teacher_ckpt)
    out = tmp_path / "o.zarr"
    assert_refused(invoke(dump(ctx, out, "--scheduler", "not an address")), "is not a dask scheduler address")
    with pytest.raises(KdcacheError, match="not a dask scheduler address"):
        dump_logits(**_dump_kwargs(teacher_ckpt, out), scheduler="tcp//nowhere")
    assert not out.exists()


def _dump_kwargs(teacher_ckpt, out: Path) -> dict:
    return dict(
        teacher="resnet8", checkpoint=str(teacher_ckpt[10]), dataset="digits", augment="cifar", views=1, out=out
    )


COMPILE_FAILS = """
import torch
class BackendCompilerFailed(RuntimeError):
    pass
BackendCompilerFailed.__module__ = "torch._dynamo.exc"
class Compiled(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
    def forward(self, *args):
        raise BackendCompilerFailed("backend='inductor' raised:\\nCppCompileError: C++ compile error\\n(119 lines)")
torch.compile = lambda net, *args, **kwargs: Compiled(net)
"""


def test_a_compile_failure_is_one_line(cache, teacher_ckpt, tmp_path):
    ctx = Ctx(tmp_path, tmp_path, cache, teacher_ckpt, prelude=COMPILE_FAILS)
    out = tmp_path / "run"
    result = invoke(train(ctx, cache, out, "--compile"), ctx.prelude)
    assert_refused(result, "--compile failed (BackendCompilerFailed: backend='inductor' raised:)")
    assert "or run without --compile" in result.stderr and not out.exists()


def test_a_refused_run_leaves_a_fresh_out_absent_and_a_users_folder_as_it_was(cache, teacher_ckpt, tmp_path):
    ctx = Ctx(tmp_path, tmp_path, cache, teacher_ckpt)
    fresh, mine = tmp_path / "fresh", tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    corrupt = ctx.copy(flip_byte)
    for args, needle in [
        (train(ctx, cache, fresh, "--student", "resnet9"), "resnet9"),
        (train(ctx, tmp_path / "nope.zarr", fresh), "not found"),
        (train(ctx, corrupt, fresh), "corrupt"),
    ]:
        for out in (fresh, mine):
            args = [mine if a == fresh and out == mine else a for a in args]
            before = snapshot(mine)
            assert_refused(invoke(args), needle)
            assert not fresh.exists() and snapshot(mine) == before and sorted(os.listdir(mine)) == ["notes.txt"]


def test_ce_on_labels_outside_the_class_count_is_one_line(tmp_path):
    root = tmp_path / "data"
    write_cifar100(root, n_train=20, n_test=10)
    batch = root / "cifar-100-python" / "train"
    import pickle

    data = pickle.loads(batch.read_bytes())
    data["fine_labels"][3] = 100
    batch.write_bytes(pickle.dumps(data))
    args = [
        "train-student",
        "--student",
        "resnet8",
        "--dataset",
        "cifar100",
        "--data-root",
        root,
        "--loss",
        "ce",
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
    ]
    assert_refused(invoke(args), "sample 3 has label 100, outside 0..99")
    assert not (tmp_path / "run").exists()


BAD_SPECS = [
    ({"student": None}, "run kd/default/seed-0: missing option --student"),
    ({"methods": {"kd": {"loss": "nope"}}}, "run kd/default/seed-0: unknown --loss 'nope'"),
    ({"methods": {"kd": {"lr": -1}}}, "run kd/default/seed-0: --lr must be positive, got -1.0"),
    ({"seeds": [0, 2**64]}, f"seed-{2**64}: --seed must be in 0 .. 2**64 - 1"),
    ({"cache": None}, "run kd/default/seed-0: --loss kd needs a teacher signal"),
    ({"dataset": "cifar100", "data-root": "CIFAR"}, "run kd/default/seed-0: cache"),
]


@pytest.mark.parametrize("change,needle", BAD_SPECS, ids=range(len(BAD_SPECS)))
def test_a_bad_spec_is_refused_before_anything_is_written(cache, tmp_path, change, needle):
    import yaml

    from kdcache import load_spec, run_sweep

    spec = {"dataset": "digits", "student": "resnet8", "cache": str(cache), "epochs": 1, "methods": {"kd": {}}}
    for key, value in change.items():
        if value == "CIFAR":
            value = str(tmp_path / "cifar")
            write_cifar100(Path(value), n_train=20, n_test=10)
        spec.pop(key) if value is None else spec.update({key: value})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    assert_refused(invoke(["sweep", path, "--out", out]), needle)
    assert not out.exists()
    with pytest.raises(KdcacheError) as raised:
        run_sweep(load_spec(path), out, progress=False)
    assert needle in str(raised.value) and not out.exists()
