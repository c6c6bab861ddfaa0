"""Your own loop, your own loss, your configs: DistillLoader, --loss module:function, --config, precision modes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_arrays

import kdcache
from kdcache.cli import main
from kdcache.losses.objective import Objective, get_loss
from kdcache.models.factory import create_model
from kdcache.store.cache import open_store
from kdcache.train.trainer import train_student

COMMON = dict(student="resnet8", dataset="cifar100", epochs=2, batch_size=32, progress=False)
CALLS: list[tuple[float, int, dict]] = []


def scaled_mse(student, teacher, labels, *, scale=1.0):
    """A user's distillation term: the scaled mean squared logit difference (records each value it returns)."""
    value = scale * (student.float() - teacher).pow(2).mean()
    CALLS.append((float(value.detach()), len(labels), {"scale": scale}))
    return value


def masked(student, teacher, labels, *, scale=1.0, mask=None, classes=(0, 1)):
    """A user loss whose defaults are not plain numbers (None, a tuple): config.yaml must still read back."""
    return scale * (student.float() - teacher).pow(2).mean()


def per_row(student, teacher, labels):
    return (student - teacher).pow(2).mean(dim=1)


def not_finite(student, teacher, labels):
    return (student - teacher).sum() * float("nan")


def raises(student, teacher, labels):
    raise ValueError("labels must be one-hot")


@pytest.fixture
def cache(make_cache, cifar_data) -> tuple[Path, Path]:
    """The session's float32 cifar cache of two views, and its data root."""
    return make_cache(dtype="float32"), cifar_data


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_own_loop_on_distill_loader_trains_the_same_student(cache, tmp_path):
    store, root = cache
    # the loop below keeps one LR for its 2 epochs: the recipe's milestones (150, ...) never come
    run = dict(out=tmp_path / "run", cache=str(store), data_root=str(root), loss="kd", lr_milestones=(150,))
    result = train_student(**run, **COMMON)
    torch.manual_seed(0)
    model = create_model("resnet8", 100)
    spec = get_loss("kd")
    objective = Objective(spec, {"temperature": 4.0, "logit_stand": False}, ce_weight=0.1, kd_weight=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rows = open_store(store).group["logits"]
    with kdcache.DistillLoader(store, "cifar100", data_root=str(root), batch_size=32, epochs=2) as loader:
        for epoch in range(2):
            loader.set_epoch(epoch)
            views = loader.epoch_views(epoch)
            model.train()
            for batch in loader:
                ids = batch.ids.numpy()
                assert np.array_equal(batch.teacher[0].numpy(), np.stack([rows[views[i], i] for i in ids]))
                total, _ = objective([model(batch.views[0])], batch.teacher, batch.labels, epoch + 1)
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
    run = _weights(tmp_path / "run")
    assert result.history[-1]["epoch"] == 2
    assert all(torch.equal(run[k], v) for k, v in model.state_dict().items())


def test_custom_loss_trains_and_its_values_reach_metrics(cache, tmp_path):
    store, root = cache
    CALLS.clear()
    out = tmp_path / "mine"
    args = ["--loss", "test_api:scaled_mse", "--loss-opt", "scale=0.5", "--kd-weight", "2"]
    r = _cli(*r_args(store, root, out), *args)
    assert r.exit_code == 0, r.output
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = len(CALLS) // 2
    for epoch, h in enumerate(history):
        calls = CALLS[epoch * steps : (epoch + 1) * steps]
        mean = sum(v * n for v, n, _ in calls) / sum(n for _, n, _ in calls)
        assert h["train_kd"] == pytest.approx(mean, rel=1e-6)
        assert h["train_loss"] == pytest.approx(h["train_ce"] + 2 * h["train_kd"], rel=1e-5)
    assert {o["scale"] for _, _, o in CALLS} == {0.5}
    config = (out / "config.yaml").read_text()
    assert "loss: test_api:scaled_mse" in config and "scale: 0.5" in config


def r_args(store: Path, root: Path, out: Path) -> list:
    return ["train-student", "--cache", store, "--data-root", root, "--out", out, "--student", "resnet8"] + [
        "--dataset",
        "cifar100",
        "--epochs",
        "2",
        "--batch-size",
        "32",
    ]


@pytest.mark.parametrize(
    "loss,opts,message",
    [
        ("test_api:per_row", [], "returned shape (32,), not a scalar tensor"),
        ("test_api:not_finite", [], "returned nan: it must be finite"),
        ("test_api:raises", [], "raised ValueError: labels must be one-hot"),
        ("test_api:missing", [], "has no 'missing'"),
        ("no_such_module_xyz:f", [], "cannot import no_such_module_xyz"),
        ("test_api:scaled_mse", ["--loss-opt", "margin=1"], "takes no option margin"),
        ("test_api:scaled_mse", ["--loss-opt", "scale"], "--loss-opt takes name=value"),
        ("kd", ["--loss-opt", "scale=1"], "--loss-opt is for losses of your own"),
        ("kdd", [], "unknown --loss 'kdd'"),
    ],
)
def test_bad_loss_callables_get_one_line(cache, tmp_path, loss, opts, message):
    store, root = cache
    r = _cli(*r_args(store, root, tmp_path / "bad"), "--loss", loss, *opts)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "bad" / "last.pt").exists()


MDISTILLER_DKD = """\
EXPERIMENT:
  NAME: ""
  TAG: "dkd,res8,res8"
  PROJECT: "cifar100_baselines"
DISTILLER:
  TYPE: "DKD"
  TEACHER: "resnet8"
  STUDENT: "resnet8"
SOLVER:
  BATCH_SIZE: 32
  EPOCHS: 2
  LR: 0.05
  LR_DECAY_STAGES: [1]
  LR_DECAY_RATE: 0.1
  WEIGHT_DECAY: 0.0005
  MOMENTUM: 0.9
  TYPE: "SGD"
DKD:
  CE_WEIGHT: 1.0
  BETA: 2.0
  T: 4.0
  WARMUP: 20
"""

EQUIVALENT_FLAGS = [
    "--student",
    "resnet8",
    "--dataset",
    "cifar100",
    "--teacher",
    "resnet8",
    "--augment",
    "cifar",
    "--loss",
    "dkd",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--lr-milestones",
    "1",
    "--beta",
    "2",
]


def test_mdistiller_dkd_config_equals_the_equivalent_flags(cache, tmp_path):
    store, root = cache
    cfg = tmp_path / "dkd_res8_res8.yaml"
    cfg.write_text(MDISTILLER_DKD)
    common = ["train-student", "--cache", store, "--data-root", root]
    a = _cli(*common, "--config", cfg, "--out", tmp_path / "yacs")
    assert a.exit_code == 0, a.output
    b = _cli(*common, *EQUIVALENT_FLAGS, "--out", tmp_path / "flags")
    assert b.exit_code == 0, b.output
    assert (tmp_path / "yacs" / "config.yaml").read_text() == (tmp_path / "flags" / "config.yaml").read_text()
    assert _same_weights(tmp_path / "yacs", tmp_path / "flags")
    again = _cli("train-student", "--config", tmp_path / "flags" / "config.yaml", "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert _same_weights(tmp_path / "again", tmp_path / "flags")


def test_flags_override_the_config_file_and_ls_arguments(cache, tmp_path):
    store, root = cache
    cfg = tmp_path / "kd.yaml"
    cfg.write_text("DISTILLER:\n  TYPE: KD\n  TEACHER: resnet8\n  STUDENT: resnet8\nSOLVER:\n  EPOCHS: 1\n")
    r = _cli(
        "train-student", "--cache", store, "--data-root", root, "--config", cfg, "--out", tmp_path / "ls",
        "--logit-stand", "--base-temp", "3", "--kd-weight", "7", "--batch-size", "48",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    config = (tmp_path / "ls" / "config.yaml").read_text()
    for line in ("logit-stand: true", "temperature: 3.0", "kd-weight: 7.0", "batch-size: 48", "weight-decay: 0.0001"):
        assert line in config.splitlines(), line
    own = tmp_path / "own.yaml"
    own.write_text(f"cache: {store}\ndata-root: {root}\nstudent: resnet8\ndataset: cifar100\nepochs: 1\nloss: kd\n")
    r = _cli("train-student", "--config", own, "--out", tmp_path / "own", "--temperature", "5")
    assert r.exit_code == 0, r.output
    assert "temperature: 5.0" in (tmp_path / "own" / "config.yaml").read_text().splitlines()


@pytest.mark.parametrize(
    "text,message",
    [
        ("DISTILLER:\n  TYPE: CRD\n", "CRD"),
        ("CRD:\n  FEAT:\n    DIM: 128\n", "CRD.FEAT.DIM"),
        ("kd-wieght: 9\n", "kd-weight"),
        ("epochs: ten\n", "epochs"),
        ("epochs: [1\n", "line"),
    ],
)
def test_bad_configs_are_refused_by_name(cache, tmp_path, text, message):
    store, root = cache
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = _cli(*r_args(store, root, tmp_path / "bad"), "--config", cfg)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "bad").exists()


def test_dump_config_equals_flags(cifar_root, teacher_ckpt, tmp_path):
    flags = dict(teacher="resnet8", dataset="cifar100", augment="cifar", views="1", dtype="float32")
    cfg = tmp_path / "dump.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in flags.items()) + f"checkpoint: {teacher_ckpt[100]}\n")
    common = ["dump-logits", "--data-root", cifar_root]
    a = _cli(*common, "--config", cfg, "--out", tmp_path / "a.zarr")
    assert a.exit_code == 0, a.output
    typed = [x for k, v in flags.items() for x in (f"--{k}", v)]
    b = _cli(*common, *typed, "--checkpoint", teacher_ckpt[100], "--out", tmp_path / "b.zarr")
    assert b.exit_code == 0, b.output
    assert_same_arrays(tmp_path / "a.zarr", tmp_path / "b.zarr")
    missing = _cli(
        "dump-logits", "--teacher", "resnet8", "--dataset", "digits", "--views", "1", "--out", tmp_path / "m"
    )
    assert missing.exit_code == 2 and "missing option --augment" in missing.output


@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False)])
def test_cached_equals_online_in_the_same_precision_mode(cache, teacher_ckpt, tmp_path, amp, channels_last):
    store, root = cache
    mode = dict(amp=amp, channels_last=channels_last, data_root=str(root), loss="kd", **COMMON)
    a = train_student(out=tmp_path / "cached", cache=str(store), **mode)
    online = dict(teacher="resnet8", checkpoint=str(teacher_ckpt[100]), augment="cifar", views=2)
    b = train_student(out=tmp_path / "online", **online, **mode)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert _same_weights(tmp_path / "cached", tmp_path / "online")
    plain = train_student(out=tmp_path / "fp32", cache=str(store), data_root=str(root), loss="kd", **COMMON)
    assert plain.history[-1]["train_loss"] != a.history[-1]["train_loss"]
    assert (tmp_path / "cached" / "tensorboard").is_dir()


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(cache, tmp_path):
    store, root = cache
    one = dict(COMMON, epochs=1)
    eager = train_student(out=tmp_path / "eager", cache=str(store), data_root=str(root), **one)
    compiled = train_student(out=tmp_path / "compiled", cache=str(store), data_root=str(root), compile=True, **one)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)
    we, wc = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert all(torch.allclose(we[k].float(), wc[k].float(), atol=1e-4) for k in we)


def test_relative_store_paths(cache, tmp_path, monkeypatch):
    store, root = cache
    monkeypatch.chdir(store.parent)
    r = _cli(*r_args(Path(store.name), root, tmp_path / "rel"), "--epochs", "1")
    assert r.exit_code == 0, r.output


def test_losses_command_lists_the_registry():
    from kdcache.losses.registry import LOSS_REGISTRY

    r = _cli("losses")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.splitlines() if line and not line.startswith(" ")]
    assert names[: len(LOSS_REGISTRY)] == list(LOSS_REGISTRY)
    assert "--beta 8.0" in r.output and "--kd-weight 9.0" in r.output


@pytest.mark.parametrize("loss,ls", [("dkd", True), ("kd", False), ("mlkd", True), ("normkd-dkd", False)])
def test_objective_create_matches_what_train_student_builds(loss, ls):
    from kdcache.train.config import TrainConfig
    from kdcache.train.trainer import build_objective

    made = Objective.create(loss, logit_stand=ls, beta=2.0) if "dkd" in loss else Objective.create(loss, logit_stand=ls)
    hyper = {"beta": 2.0} if "dkd" in loss else {}
    built = build_objective(TrainConfig("resnet8", loss=loss, logit_stand=ls, **hyper).resolved(), torch.device("cpu"))
    assert (made.options, made.ce_weight, made.kd_weight, made.warmup) == (
        built.options,
        built.ce_weight,
        built.kd_weight,
        built.warmup,
    )
    assert made.warmup == (20 if "dkd" in loss else 0)
    with pytest.raises(kdcache.KdcacheError, match="takes no option tempreature"):
        Objective.create(loss, tempreature=2)


def test_config_of_a_user_loss_with_none_and_list_defaults_reads_back(cache, tmp_path):
    from kdcache.settings import read_settings

    store, root = cache
    r = _cli(*r_args(store, root, tmp_path / "m"), "--loss", "test_api:masked", "--epochs", "1")
    assert r.exit_code == 0, r.output
    settings = read_settings(tmp_path / "m" / "config.yaml", "train-student")
    assert settings["loss_opt"] == {"scale": 1.0, "mask": None, "classes": [0, 1]}


def test_a_run_folder_in_use_is_refused(cache, tmp_path):
    import fcntl
    import os

    store, root = cache
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another student holds it
    try:
        r = _cli(*r_args(store, root, out))
    finally:
        os.close(fd)
    assert r.exit_code == 2 and "is in use by another running student" in r.output
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
