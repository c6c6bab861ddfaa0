"""Config files: kdcache's own form, the mdistiller / LS / MLKD yacs form, LS's command-line arguments.

The yacs texts below are written from the upstream repositories' configs (megvii-research/mdistiller,
sunshangquan/logit-standardization-KD, Jin-Ying/Multi-Level-Logit-Distillation); the expected numbers come from their
``mdistiller/engine/cfg.py`` and ``tools/train.py``, and the loss checks re-implement upstream's KD and DKD here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdcache.errors import KdcacheError
from kdcache.losses.functions import dkd_loss, kd_loss
from kdcache.settings import read_settings, resolve, write_settings
from kdcache.train.configs import apply_ls_args, from_mdistiller, read_yacs


def read(path: Path, command: str) -> dict[str, object]:
    """A settings file as the command reads it (train-student also takes the yacs form)."""
    return read_settings(path, command, yacs=read_yacs if command == "train-student" else None)


SOLVER_CIFAR = """\
SOLVER:
  BATCH_SIZE: 64
  EPOCHS: 240
  LR: {lr}
  LR_DECAY_STAGES: [150, 180, 210]
  LR_DECAY_RATE: 0.1
  WEIGHT_DECAY: 0.0005
  MOMENTUM: 0.9
  TYPE: "SGD"
"""


def cifar_config(kind: str, teacher: str, student: str, lr: float = 0.05, extra: str = "") -> str:
    """The shape of every mdistiller-family CIFAR-100 config: experiment, distiller, the 240-epoch SGD schedule."""
    head = (
        f'EXPERIMENT:\n  NAME: ""\n  TAG: "{kind.lower()},{teacher},{student}"\n  PROJECT: "cifar100_baselines"\n'
        f'DISTILLER:\n  TYPE: "{kind}"\n  TEACHER: "{teacher}"\n  STUDENT: "{student}"\n'
    )
    return head + SOLVER_CIFAR.format(lr=lr) + extra


# mdistiller configs/cifar100/dkd/res32x4_res8x4.yaml: no DKD section, so BETA is cfg.py's 8.
DKD_RES32X4_RES8X4 = cifar_config("DKD", "resnet32x4", "resnet8x4")
# mdistiller configs/cifar100/kd.yaml (resnet32x4 -> resnet8x4): no KD section, so T 4, CE 0.1, KD 0.9.
KD_RES32X4_RES8X4 = cifar_config("KD", "resnet32x4", "resnet8x4")
# mdistiller configs/imagenet/r34_r18/kd.yaml.
KD_IMAGENET = """\
EXPERIMENT:
  NAME: ""
  TAG: "kd,res34,res18"
  PROJECT: "imagenet_baselines"
DATASET:
  TYPE: "imagenet"
  NUM_WORKERS: 32
  TEST:
    BATCH_SIZE: 128
DISTILLER:
  TYPE: "KD"
  TEACHER: "ResNet34"
  STUDENT: "ResNet18"
SOLVER:
  BATCH_SIZE: 512
  EPOCHS: 100
  LR: 0.2
  LR_DECAY_STAGES: [30, 60, 90]
  LR_DECAY_RATE: 0.1
  WEIGHT_DECAY: 0.0001
  MOMENTUM: 0.9
  TYPE: "SGD"
KD:
  TEMPERATURE: 1
  LOSS:
    CE_WEIGHT: 0.5
    KD_WEIGHT: 0.5
LOG:
  TENSORBOARD_FREQ: 50
  SAVE_CHECKPOINT_FREQ: 10
"""
# LS configs/cifar100/mlkd/resnet32x4_resnet8x4.yaml: 480 epochs, LR 0.025, the weak+strong "ours" trainer.
MLKD_LS = cifar_config("MLKD", "resnet32x4", "resnet8x4", lr=0.025).replace("EPOCHS: 240", "EPOCHS: 480")
MLKD_LS += '  TRAINER: "ours"\n'
# MLKD repo configs/cifar100/ours/res32x4_shuv1.yaml: TYPE KD_ours, 960 epochs, LR 0.01.
MLKD_REPO = cifar_config("KD_ours", "resnet32x4", "ShuffleV1", lr=0.01).replace("EPOCHS: 240", "EPOCHS: 960")
MLKD_REPO += '  TRAINER: "ours"\n'
# mdistiller configs/cifar100/crd.yaml and reviewkd.yaml.
CRD = cifar_config("CRD", "resnet32x4", "resnet8x4") + '  TRAINER: "crd"\n'
REVIEWKD = cifar_config("REVIEWKD", "resnet32x4", "resnet8x4", extra="REVIEWKD:\n  REVIEWKD_WEIGHT: 5.0\n")


def _yaml(text: str) -> dict:
    return yaml.safe_load(text)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(tmp_path: Path, text: str, command: str = "train-student") -> str:
    """The one-line message with which ``text`` is refused."""
    with pytest.raises(KdcacheError) as info:
        read(write(tmp_path, text), command)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- kdcache's form


def test_kdcache_form_round_trips(tmp_path):
    settings = {
        "student": "resnet8x4",
        "loss": "dkd",
        "kd_weight": 9.0,
        "beta": 8.0,
        "logit_stand": True,
        "lr_milestones": (150, 180, 210),
        "cache": ["a.zarr", "b.zarr"],
        "epochs": 240,
        "weight_decay": 5e-4,
        "views": "all",
        "data_root": Path("data/cifar"),
        "lr": None,
    }
    path = write_settings(settings, tmp_path / "sub" / "run.yaml")
    text = path.read_text()
    assert "kd-weight: 9.0" in text and "logit-stand: true" in text and "lr:" not in text
    keys = [line.split(":")[0] for line in text.splitlines()]
    assert keys == sorted(keys)
    expected = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items() if v is not None}
    assert read(path, "train-student") == expected


def test_kdcache_form_normalizes_values(tmp_path):
    text = "kd-weight: 9\nweight-decay: 5e-4\nlr-milestones: 150,180,210\ncache: one.zarr\nepochs: 30\n"
    got = read(write(tmp_path, text), "train-student")
    assert got == {
        "kd_weight": 9.0,
        "weight_decay": 5e-4,  # PyYAML reads 5e-4 as text; it is still a number here
        "lr_milestones": (150, 180, 210),
        "cache": ["one.zarr"],
        "epochs": 30,
    }
    assert type(got["kd_weight"]) is float
    listed = read(write(tmp_path, "lr-milestones: [30, 60, 90]\ncache: [a, b]\n"), "train-student")
    assert listed == {"lr_milestones": (30, 60, 90), "cache": ["a", "b"]}


def test_dump_logits_form(tmp_path):
    text = "teacher: resnet32x4\ndataset: cifar100\naugment: cifar\nviews: all\nformat: topk:5\nbatch-size: 512\n"
    got = read(write(tmp_path, text), "dump-logits")
    assert got["views"] == "all" and got["format"] == "topk:5" and got["batch_size"] == 512
    assert "train-student" in refusal(tmp_path, KD_RES32X4_RES8X4, "dump-logits")
    assert "kd-weight" in refusal(tmp_path, "kd-weight: 9\n", "dump-logits")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kd_weight: 9\n", ["write kd-weight", "kd_weight"]),
        ("kd-wieght: 9\n", ["'kd-wieght'", "did you mean kd-weight?"]),
        ("epochs: ten\n", ["epochs takes an integer", "'ten'"]),
        ("epochs: 2.5\n", ["epochs takes an integer"]),
        ("epochs: '30'\n", ["epochs takes an integer", "'30'"]),
        ("lr: .inf\n", ["lr takes a finite number"]),
        ("lr: fast\n", ["lr takes a finite number"]),
        ("logit-stand: 1\n", ["logit-stand takes true or false"]),
        ("student: 8\n", ["student takes text"]),
        ("lr-milestones: [150, x]\n", ["lr-milestones takes epochs"]),
        ("cache: [1, 2]\n", ["cache takes a store path"]),
        ("lr:\n", ["lr has no value"]),
        ("epochs: 10\nepochs: 20\n", ["'epochs' appears twice", "line 2"]),
        ("epochs: [1, 2\n", ["YAML syntax error at line"]),
        ("- epochs\n", ["must be a mapping", "list"]),
        ("", ["must be a mapping", "empty"]),
        ("KD:\n  TEMPERATURE: 4\nkd-weight: 9\n", ["mixes mdistiller sections", "kd-weight"]),
    ],
)
def test_kdcache_form_refusals(tmp_path, text, words):
    message = refusal(tmp_path, text)
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    with pytest.raises(KdcacheError, match="not found"):
        read(tmp_path / "nope.yaml", "train-student")


def test_merge_puts_the_command_line_on_top(tmp_path):
    file_values = {"kd_weight": 9.0, "epochs": 240}
    path = write_settings(file_values, Path(tmp_path) / "f.yaml")
    assert resolve("train-student", path, {"epochs": 10, "student": "s", "dataset": "d", "out": "o"}) == {
        **file_values,
        "epochs": 10,
        "student": "s",
        "dataset": "d",
        "out": "o",
    }
    assert file_values == {"kd_weight": 9.0, "epochs": 240}


# ---------------------------------------------------------------- the mdistiller form


def test_dkd_res32x4_res8x4_translates_to_upstream_values(tmp_path):
    got = read(write(tmp_path, DKD_RES32X4_RES8X4), "train-student")
    assert got == {
        "loss": "dkd",
        "dataset": "cifar100",
        "student": "resnet8x4",
        "teacher": "resnet32x4",
        "augment": "cifar",
        "epochs": 240,
        "batch_size": 64,
        "lr": 0.05,
        "lr_milestones": (150, 180, 210),
        "lr_decay_rate": 0.1,
        "weight_decay": 0.0005,
        "momentum": 0.9,
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "warmup": 20,
        "logit_stand": False,
    }


@pytest.mark.parametrize(
    ("teacher", "student", "lr", "beta"),
    [
        ("resnet56", "resnet20", 0.05, 2.0),  # configs/cifar100/dkd/res56_res20.yaml
        ("resnet110", "resnet32", 0.05, 2.0),  # res110_res32.yaml
        ("wrn_40_2", "wrn_16_2", 0.05, 6.0),  # wrn40_2_wrn_16_2.yaml
        ("vgg13", "vgg8", 0.05, 6.0),  # vgg13_vgg8.yaml
        ("vgg13", "MobileNetV2", 0.01, 6.0),  # vgg13_mv2.yaml
        ("resnet32x4", "ShuffleV1", 0.01, None),  # res32x4_shuv1.yaml: no DKD section, BETA 8
    ],
)
def test_dkd_per_pair_values(tmp_path, teacher, student, lr, beta):
    extra = f"DKD:\n  BETA: {beta}\n" if beta is not None else ""
    got = read(write(tmp_path, cifar_config("DKD", teacher, student, lr, extra)), "train-student")
    assert (got["teacher"], got["student"], got["lr"], got["beta"]) == (teacher, student, lr, beta or 8.0)


def test_minimal_files_get_mdistiller_defaults():
    # mdistiller/engine/cfg.py: SOLVER (240 epochs, batch 64, LR 0.05, x0.1 at 150/180/210, WD 1e-4, momentum 0.9),
    # KD (T 4, CE 0.1, KD 0.9), DKD (CE 1, alpha 1, beta 8, T 4, warm-up 20), DISTILLER.STUDENT resnet32.
    schedule = {
        "epochs": 240,
        "batch_size": 64,
        "lr": 0.05,
        "lr_milestones": (150, 180, 210),
        "lr_decay_rate": 0.1,
        "weight_decay": 0.0001,
        "momentum": 0.9,
    }
    kd = from_mdistiller({"DISTILLER": {"TYPE": "KD", "TEACHER": "resnet32x4", "STUDENT": "resnet8x4"}})
    assert kd == {
        "loss": "kd",
        "dataset": "cifar100",
        "student": "resnet8x4",
        "teacher": "resnet32x4",
        "augment": "cifar",
        **schedule,
        "ce_weight": 0.1,
        "kd_weight": 0.9,
        "temperature": 4.0,
        "logit_stand": False,
    }
    dkd = from_mdistiller({"DISTILLER": {"TYPE": "DKD", "TEACHER": "resnet32x4", "STUDENT": "resnet8x4"}})
    expected = {"ce_weight": 1.0, "kd_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}
    assert {k: dkd[k] for k in expected} == expected
    vanilla = from_mdistiller({"EXPERIMENT": {"TAG": "vanilla"}})
    expected = {"loss": "ce", "dataset": "cifar100", "student": "resnet32", "augment": "cifar", "ce_weight": 1.0}
    assert vanilla == {**expected, **schedule}  # TYPE NONE: Vanilla's bare CE, and no teacher
    assert from_mdistiller({"DISTILLER": {"TYPE": "NONE"}}) == vanilla


def test_imagenet_kd(tmp_path):
    got = read(write(tmp_path, KD_IMAGENET), "train-student")
    assert got["student"] == "torchvision.resnet18" and got["teacher"] == "torchvision.resnet34"
    assert got["dataset"] == "imagenet" and got["augment"] == "imagenet" and got["workers"] == 32
    assert (got["temperature"], got["ce_weight"], got["kd_weight"]) == (1.0, 0.5, 0.5)
    assert (got["epochs"], got["batch_size"], got["lr"], got["lr_milestones"]) == (100, 512, 0.2, (30, 60, 90))
    assert got["weight_decay"] == 0.0001
    assert "test_batch_size" not in got  # DATASET.TEST.BATCH_SIZE and LOG.* are accepted without effect


def test_mlkd_configs():
    ls = from_mdistiller(_yaml(MLKD_LS))
    assert ls["loss"] == "mlkd" and ls["augment"] == "mlkd" and ls["mlkd_variant"] == "reference"
    assert (ls["epochs"], ls["lr"], ls["student"], ls["teacher"]) == (480, 0.025, "resnet8x4", "resnet32x4")
    # TYPE MLKD only runs in LS's repo, whose cfg.py has KD.TEMPERATURE 2 and KD.LOSS.KD_WEIGHT 9.
    assert (ls["temperature"], ls["kd_weight"], ls["ce_weight"], ls["logit_stand"]) == (2.0, 9.0, 0.1, False)
    repo = from_mdistiller(_yaml(MLKD_REPO))
    assert repo["loss"] == "mlkd" and repo["augment"] == "mlkd" and repo["student"] == "ShuffleV1"
    assert (repo["epochs"], repo["lr"]) == (960, 0.01)
    assert (repo["temperature"], repo["kd_weight"], repo["ce_weight"]) == (4.0, 0.9, 0.1)  # mdistiller's cfg.py
    assert "logit_stand" in repo and repo["logit_stand"] is False
    stand = apply_ls_args(ls, True, None, None)
    assert (stand["temperature"], stand["kd_weight"], stand["logit_stand"], stand["ce_weight"]) == (2.0, 9.0, True, 0.1)


def test_ls_key_in_the_file_means_ls_defaults():
    cfg = {"DISTILLER": {"TYPE": "KD", "TEACHER": "resnet32x4", "STUDENT": "resnet8x4"}}
    got = from_mdistiller({**cfg, "EXPERIMENT": {"LOGIT_STAND": True}})
    assert (got["temperature"], got["kd_weight"], got["ce_weight"], got["logit_stand"]) == (2.0, 9.0, 0.1, True)


def test_translated_config_round_trips_through_kdcache_form(tmp_path):
    settings = from_mdistiller(_yaml(MLKD_LS))
    assert read(write_settings(settings, tmp_path / "mlkd.yaml"), "train-student") == settings


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (CRD, ["DISTILLER.TYPE CRD", "feature distiller"]),
        (REVIEWKD, ["DISTILLER.TYPE REVIEWKD"]),
        (KD_RES32X4_RES8X4 + "CRD:\n  FEAT:\n    DIM: 128\n", ["CRD.FEAT.DIM", "CRD distiller"]),
        (KD_RES32X4_RES8X4 + "  DOT:\n    DELTA: 0.075\n", ["SOLVER.DOT.DELTA", "DOT"]),
        (KD_RES32X4_RES8X4 + '  TRAINER: "crd"\n', ["SOLVER.TRAINER 'crd'"]),
        (KD_RES32X4_RES8X4 + '  TRAINER: "ours"\n', ["SOLVER.TRAINER 'ours'", "DISTILLER.TYPE KD"]),
        (KD_RES32X4_RES8X4.replace('TYPE: "SGD"', 'TYPE: "Adam"'), ["SOLVER.TYPE 'Adam'"]),
        (KD_RES32X4_RES8X4 + "DKD:\n  BETA: 8.0\n", ["DKD.BETA has no effect", "KD"]),
        (DKD_RES32X4_RES8X4 + "KD:\n  TEMPERATURE: 4\n", ["KD.TEMPERATURE has no effect", "DKD"]),
        (KD_RES32X4_RES8X4 + "MLKD:\n  TEMPERATURE: 4\n", ["unknown key MLKD.TEMPERATURE"]),
        (KD_RES32X4_RES8X4 + "FOO:\n  BAR: 1\n", ["unknown key FOO.BAR"]),
        (KD_RES32X4_RES8X4.replace("LR:", "LRR:"), ["unknown key SOLVER.LRR", "did you mean SOLVER.LR?"]),
        (KD_RES32X4_RES8X4.replace("EPOCHS: 240", "EPOCHS: ten"), ["SOLVER.EPOCHS takes an integer", "'ten'"]),
        (KD_RES32X4_RES8X4.replace('"resnet8x4"', '"resnet9x4"'), ["DISTILLER.STUDENT 'resnet9x4'", "resnet8x4"]),
        (KD_RES32X4_RES8X4 + 'DATASET:\n  TYPE: "tiny_imagenet"\n', ["DATASET.TYPE 'tiny_imagenet'"]),
        (KD_IMAGENET.replace('"ResNet18"', '"MobileNetV1"'), ["DISTILLER.STUDENT 'MobileNetV1'", "torchvision"]),
        (cifar_config("Sonly", "resnet32x4", "resnet8x4"), ["DISTILLER.TYPE 'Sonly'"]),
        (cifar_config("kd", "resnet32x4", "resnet8x4"), ["DISTILLER.TYPE 'kd'", "did you mean KD?"]),
        (cifar_config("NONE", "resnet32x4", "resnet8x4") + "EXPERIMENT:\n  LOGIT_STAND: true\n", ["appears twice"]),
        ('DISTILLER:\n  TYPE: "NONE"\nEXPERIMENT:\n  LOGIT_STAND: true\n', ["EXPERIMENT.LOGIT_STAND has no effect"]),
        ('DISTILLER:\n  TYPE: "KD_ours"\nEXPERIMENT:\n  LOGIT_STAND: true\n', ["EXPERIMENT.LOGIT_STAND", "MLKD"]),
        ("DISTILLER: 5\n", ["DISTILLER is a section"]),
    ],
)
def test_mdistiller_refusals(tmp_path, text, words):
    message = refusal(tmp_path, text)
    assert message.startswith(str(tmp_path))
    for word in words:
        assert word in message


# ---------------------------------------------------------------- LS's command line


def test_ls_args_follow_ls_train_py():
    kd = from_mdistiller(_yaml(KD_RES32X4_RES8X4))
    assert apply_ls_args(kd, False, None, None) == kd
    stand = apply_ls_args(kd, True, 2, 9)  # the README's --logit-stand --base-temp 2 --kd-weight 9
    assert stand == {**kd, "logit_stand": True, "temperature": 2.0, "kd_weight": 9.0}
    assert apply_ls_args(kd, True, None, None) == stand  # argparse defaults 2 and 9
    dkd = from_mdistiller(_yaml(DKD_RES32X4_RES8X4))
    dkd_stand = apply_ls_args(dkd, True, 2, 12)  # DKD: ALPHA and BETA multiplied by the weight
    assert (dkd_stand["kd_weight"], dkd_stand["alpha"], dkd_stand["beta"], dkd_stand["temperature"]) == (12, 1, 8, 2)
    vanilla = from_mdistiller({"DISTILLER": {"TYPE": "NONE"}})
    assert apply_ls_args(vanilla, True, 2, 9) == vanilla  # LS only touches KD, DKD and MLKD
    with pytest.raises(KdcacheError, match="only with --logit-stand"):
        apply_ls_args(kd, False, 2, None)


def _upstream_normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / (1e-7 + x.std(dim=-1, keepdim=True))


def _upstream_kd(s: torch.Tensor, t: torch.Tensor, temperature: float, stand: bool) -> torch.Tensor:
    """LS's ``KD.py`` kd_loss (mdistiller's when ``stand`` is False): T² times the batch-mean KL."""
    s, t = (_upstream_normalize(s), _upstream_normalize(t)) if stand else (s, t)
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1), reduction="none")
    return kl.sum(1).mean() * temperature**2


def _upstream_dkd(s, t, y, alpha: float, beta: float, temperature: float, stand: bool) -> torch.Tensor:
    """LS's ``DKD.py`` dkd_loss: binary masses by masked sums, NCKD by pushing the target logit down by 1000."""
    s, t = (_upstream_normalize(s), _upstream_normalize(t)) if stand else (s, t)
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    ps2 = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], dim=1)
    pt2 = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(ps2), pt2, reduction="sum") * temperature**2 / y.shape[0]
    log_s = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    p_t = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_s, p_t, reduction="sum") * temperature**2 / y.shape[0]
    return alpha * tckd + beta * nckd


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 100, generator=g, dtype=torch.float64) * 2
    t = torch.randn(16, 100, generator=g, dtype=torch.float64) * 3
    return s, t, torch.randint(0, 100, (16,), generator=g)


@pytest.mark.parametrize("stand", [False, True])
def test_kd_total_loss_equals_upstream(stand):
    s, t, y = _batch()
    settings = from_mdistiller(_yaml(KD_RES32X4_RES8X4))
    # upstream: mdistiller's cfg.py KD (T 4, CE 0.1, KD 0.9); LS's train.py --logit-stand sets T 2 and KD weight 9
    temperature, ce_w, kd_w = (2.0, 0.1, 9.0) if stand else (4.0, 0.1, 0.9)
    if stand:
        settings = apply_ls_args(settings, True, 2, 9)
    upstream = ce_w * F.cross_entropy(s, y) + kd_w * _upstream_kd(s, t, temperature, stand)
    ce = F.cross_entropy(s, y)
    ours = settings["ce_weight"] * ce + settings["kd_weight"] * kd_loss(
        s, t, settings["temperature"], settings["logit_stand"]
    )
    torch.testing.assert_close(ours, upstream, rtol=1e-10, atol=0)


@pytest.mark.parametrize("stand", [False, True])
@pytest.mark.parametrize("epoch", [5, 30])
def test_dkd_total_loss_equals_upstream(stand, epoch):
    s, t, y = _batch()
    settings = from_mdistiller(_yaml(DKD_RES32X4_RES8X4))
    # upstream: cfg.py DKD (CE 1, alpha 1, beta 8, T 4, warm-up 20); LS --logit-stand --kd-weight 9 --base-temp 2
    # makes alpha 9, beta 72, T 2
    alpha, beta, temperature = (9.0, 72.0, 2.0) if stand else (1.0, 8.0, 4.0)
    if stand:
        settings = apply_ls_args(settings, True, 2, 9)
    warm = min(epoch / 20, 1.0)
    upstream = 1.0 * F.cross_entropy(s, y) + warm * _upstream_dkd(s, t, y, alpha, beta, temperature, stand)
    term = dkd_loss(
        s, t, y, settings["alpha"], settings["beta"], settings["temperature"], logit_stand=settings["logit_stand"]
    )
    ours_warm = min(epoch / settings["warmup"], 1.0)
    ours = settings["ce_weight"] * F.cross_entropy(s, y) + ours_warm * settings["kd_weight"] * term
    torch.testing.assert_close(ours, upstream, rtol=1e-9, atol=0)
