"""Config files of a student run: kdcache's form (:mod:`kdcache.settings.files`) and the mdistiller yacs form.

The yacs form is the one of
megvii-research/mdistiller and its forks logit-standardization-KD (LS) and Multi-Level-Logit-Distillation (MLKD):
upper-case sections (``DISTILLER``, ``SOLVER``, ``KD``, ...). It is translated to the settings upstream would train
with, its defaults filled in from upstream's ``mdistiller/engine/cfg.py``. A key kdcache cannot honour is refused by
name, never ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.settings import read_settings, read_values, resolve
from kdcache.settings.files import is_yacs, read_yaml
from kdcache.settings.table import TRAIN
from kdcache.settings.values import as_bool, as_epochs, as_float, as_int, as_text

# ---------------------------------------------------------------- the mdistiller (yacs) form

# Upstream defaults, from mdistiller/engine/cfg.py (EXPERIMENT.LOGIT_STAND is LS's); numbers read as float take ints.
_MDISTILLER_DEFAULTS: dict[str, object] = {
    "EXPERIMENT.PROJECT": "distill",
    "EXPERIMENT.NAME": "",
    "EXPERIMENT.TAG": "default",
    "EXPERIMENT.LOGIT_STAND": False,
    "DATASET.TYPE": "cifar100",
    "DATASET.NUM_WORKERS": 2,
    "DATASET.TEST.BATCH_SIZE": 64,
    "DISTILLER.TYPE": "NONE",
    "DISTILLER.TEACHER": "ResNet50",
    "DISTILLER.STUDENT": "resnet32",
    "SOLVER.TRAINER": "base",
    "SOLVER.BATCH_SIZE": 64,
    "SOLVER.EPOCHS": 240,
    "SOLVER.LR": 0.05,
    "SOLVER.LR_DECAY_STAGES": (150, 180, 210),
    "SOLVER.LR_DECAY_RATE": 0.1,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.TYPE": "SGD",
    "LOG.TENSORBOARD_FREQ": 500,
    "LOG.SAVE_CHECKPOINT_FREQ": 40,
    "LOG.PREFIX": "./output",
    "LOG.WANDB": True,
    "KD.TEMPERATURE": 4.0,
    "KD.LOSS.CE_WEIGHT": 0.1,
    "KD.LOSS.KD_WEIGHT": 0.9,
    "DKD.CE_WEIGHT": 1.0,
    "DKD.ALPHA": 1.0,
    "DKD.BETA": 8.0,
    "DKD.T": 4.0,
    "DKD.WARMUP": 20,
}
# LS's cfg.py changes two KD defaults. A file only LS's repo accepts (TYPE MLKD, or the LS key EXPERIMENT.LOGIT_STAND,
# which mdistiller's yacs refuses) gets these; any other file gets mdistiller's.
_LS_KD_DEFAULTS = {"KD.TEMPERATURE": 2.0, "KD.LOSS.KD_WEIGHT": 9.0}
_SECTIONS = {key.rsplit(".", i)[0] for key in _MDISTILLER_DEFAULTS for i in range(1, key.count(".") + 1)}
_BY_TYPE = {bool: as_bool, int: as_int, float: as_float, str: as_text, tuple: as_epochs}
_LOSSES = {"NONE": "ce", "KD": "kd", "DKD": "dkd", "MLKD": "mlkd", "KD_ours": "mlkd"}  # KD_ours: MLKD repo's name
_READS = {"NONE": (), "KD": ("KD",), "DKD": ("DKD",), "MLKD": ("KD",), "KD_ours": ("KD",)}  # sections each type uses
_FEATURE_DISTILLERS = ("AT", "OFD", "RKD", "FITNET", "KDSVD", "CRD", "NST", "PKT", "SP", "VID", "REVIEWKD")
_UNSUPPORTED_SECTIONS = {**{s: f"mdistiller's {s} distiller" for s in _FEATURE_DISTILLERS}, "SOLVER.DOT": "DOT"}
_IMAGENET_MODELS = {f"ResNet{d}": f"torchvision.resnet{d}" for d in (18, 34, 50, 101)}  # the same nets and weights


def from_mdistiller(cfg: dict) -> dict[str, object]:
    """Translate an mdistiller / LS / MLKD yacs config into train-student settings, upstream defaults filled in.

    The result is the complete set upstream trains with, so the run does not depend on kdcache's own defaults.
    """
    given = _flatten(cfg)
    kind = _check_type(given.get("DISTILLER.TYPE", "NONE"))
    ls_only = kind == "MLKD" or "EXPERIMENT.LOGIT_STAND" in given
    defaults = {**_MDISTILLER_DEFAULTS, **(_LS_KD_DEFAULTS if ls_only else {})}
    values = dict(defaults)
    for key, value in given.items():
        _check_key(key, kind)
        try:
            values[key] = _BY_TYPE[type(defaults[key])](value)
        except ValueError as exc:
            raise KdcacheError(f"{key} takes {exc}, got {value!r}") from None
    _check_run(values, kind)
    settings = _common_settings(values, kind, "DATASET.NUM_WORKERS" in given)
    settings.update(_loss_settings(values, kind))
    return settings


def _flatten(node: dict, prefix: str = "") -> dict[str, object]:
    """``{"SOLVER": {"LR": 0.1}}`` as ``{"SOLVER.LR": 0.1}``; a section must be a mapping, a key must be text."""
    leaves: dict[str, object] = {}
    for key, value in node.items():
        if not isinstance(key, str):
            raise KdcacheError(f"key {prefix}{key!r} is not a name: mdistiller keys are upper-case text")
        dotted = prefix + key
        if dotted in _SECTIONS and not isinstance(value, dict):
            raise KdcacheError(f"{dotted} is a section: give it as a mapping of keys, not {value!r}")
        if dotted in _SECTIONS or (isinstance(value, dict) and value and dotted not in _MDISTILLER_DEFAULTS):
            leaves.update(_flatten(value, dotted + "."))
        else:
            leaves[dotted] = value
    return leaves


def _check_type(kind: object) -> str:
    """``kind``, the distiller TYPE; one kdcache does not train is refused by name."""
    if isinstance(kind, str) and kind in _LOSSES:
        return kind
    supported = ", ".join(_LOSSES)
    if kind in _FEATURE_DISTILLERS:
        raise KdcacheError(
            f"DISTILLER.TYPE {kind} is a feature distiller, which kdcache does not implement: it distills cached "
            f"logits (TYPE {supported})"
        )
    same = {name.lower(): name for name in _LOSSES}.get(str(kind).lower())
    hint = f"did you mean {same}? (names are case-sensitive)" if same else f"choose one of {supported}"
    raise KdcacheError(f"DISTILLER.TYPE {kind!r} is not supported: {hint}")


def _check_key(key: str, kind: str) -> None:
    """Refuse a key that is unknown, belongs to an unimplemented method, or has no effect with this TYPE."""
    section = key.split(".")[0]
    if key not in _MDISTILLER_DEFAULTS:
        for prefix, what in _UNSUPPORTED_SECTIONS.items():
            if key == prefix or key.startswith(prefix + "."):
                raise KdcacheError(f"{key} configures {what}, which kdcache does not implement: remove it")
        close = difflib.get_close_matches(key, list(_MDISTILLER_DEFAULTS), n=1)
        hint = f"did you mean {close[0]}?" if close else "see docs/configs.md for the keys kdcache reads"
        raise KdcacheError(f"unknown key {key}: {hint}")
    if section in ("KD", "DKD") and section not in _READS[kind]:
        raise KdcacheError(f"{key} has no effect with DISTILLER.TYPE {kind}: remove it or change the TYPE")
    if key == "EXPERIMENT.LOGIT_STAND" and kind == "NONE":
        raise KdcacheError(f"{key} has no effect with DISTILLER.TYPE NONE: remove it")
    if key == "EXPERIMENT.LOGIT_STAND" and kind == "KD_ours":
        raise KdcacheError(f"{key} is LS's key and KD_ours the MLKD repo's TYPE: LS calls it TYPE MLKD")


def _check_run(values: dict[str, object], kind: str) -> None:
    """Refuse what kdcache does not reproduce: optimizers but SGD, trainers but 'base' (MLKD: 'ours'), other data."""
    if values["SOLVER.TYPE"] != "SGD":
        raise KdcacheError(f"SOLVER.TYPE {values['SOLVER.TYPE']!r} is not supported: kdcache trains with SGD")
    trainer = values["SOLVER.TRAINER"]
    if trainer != "base" and not (trainer == "ours" and _LOSSES[kind] == "mlkd"):
        raise KdcacheError(
            f"SOLVER.TRAINER {trainer!r} is not supported with DISTILLER.TYPE {kind}: kdcache reproduces the 'base' "
            "trainer (and 'ours', the weak+strong trainer, for MLKD)"
        )
    if values["DATASET.TYPE"] not in ("cifar100", "imagenet"):
        raise KdcacheError(f"DATASET.TYPE {values['DATASET.TYPE']!r} is not supported: use cifar100 or imagenet")


def _common_settings(values: dict[str, object], kind: str, with_workers: bool) -> dict[str, object]:
    """Dataset, models and the SGD schedule, in train-student option names."""
    dataset = str(values["DATASET.TYPE"])  # text: _BY_TYPE read it, _check_run checked it
    loss = _LOSSES[kind]
    settings: dict[str, object] = {
        "loss": loss,
        "dataset": dataset,
        "student": _model_name("DISTILLER.STUDENT", str(values["DISTILLER.STUDENT"]), dataset),
        "augment": "mlkd" if loss == "mlkd" else "cifar" if dataset == "cifar100" else "imagenet",
        "epochs": values["SOLVER.EPOCHS"],
        "batch_size": values["SOLVER.BATCH_SIZE"],
        "lr": values["SOLVER.LR"],
        "lr_milestones": values["SOLVER.LR_DECAY_STAGES"],
        "lr_decay_rate": values["SOLVER.LR_DECAY_RATE"],
        "weight_decay": values["SOLVER.WEIGHT_DECAY"],
        "momentum": values["SOLVER.MOMENTUM"],
    }
    if loss != "ce":  # mdistiller's vanilla run never builds its teacher
        settings["teacher"] = _model_name("DISTILLER.TEACHER", str(values["DISTILLER.TEACHER"]), dataset)
    if with_workers:
        settings["workers"] = values["DATASET.NUM_WORKERS"]
    return settings


def _loss_settings(values: dict[str, object], kind: str) -> dict[str, object]:
    """The loss weights and temperature; kdcache's kd/dkd/mlkd terms include τ² and the Z-score as upstream's do."""
    if kind == "NONE":
        return {"ce_weight": 1.0}  # Vanilla: the bare cross-entropy
    stand = {"logit_stand": values["EXPERIMENT.LOGIT_STAND"]}
    if kind == "DKD":  # kdcache multiplies α and β by kd_weight; upstream has no such factor, so 1
        return {
            "ce_weight": values["DKD.CE_WEIGHT"],
            "kd_weight": 1.0,
            "alpha": values["DKD.ALPHA"],
            "beta": values["DKD.BETA"],
            "temperature": values["DKD.T"],
            "warmup": values["DKD.WARMUP"],
            **stand,
        }
    settings = {
        "ce_weight": values["KD.LOSS.CE_WEIGHT"],
        "kd_weight": values["KD.LOSS.KD_WEIGHT"],
        "temperature": values["KD.TEMPERATURE"],
        **stand,
    }
    if kind != "KD":  # MLKD: the released code's loss, which is what its published numbers used
        settings["mlkd_variant"] = "reference"
    return settings


def _model_name(key: str, name: str, dataset: str) -> str:
    """kdcache's name for an upstream model: the CIFAR zoo shares mdistiller's names; ImageNet's are torchvision's."""
    if dataset == "imagenet":
        if name in _IMAGENET_MODELS:
            return _IMAGENET_MODELS[name]
        raise KdcacheError(
            f"{key} {name!r} has no torchvision counterpart kdcache can build (upstream's ImageNet MobileNetV1, and "
            f"the LS/MLKD 'MobileNetV2', which is a MobileNetV1): use one of {', '.join(_IMAGENET_MODELS)}"
        )
    from kdcache.models.factory import list_models

    zoo = list_models()
    if name in zoo:
        return name
    close = difflib.get_close_matches(name, zoo, n=1)
    hint = f"did you mean {close[0]}?" if close else "run `kdcache models` for the list"
    raise KdcacheError(f"{key} {name!r} is not in kdcache's model zoo: {hint}")


def apply_ls_args(settings: dict, logit_stand: bool, base_temp: float | None, kd_weight: float | None) -> dict:
    """Apply LS's ``tools/train.py --logit-stand --base-temp T --kd-weight W`` to translated settings.

    As upstream: only with ``logit_stand`` and only for KD, DKD and MLKD; T defaults to 2 and W to 9. KD and MLKD get
    temperature T and KD weight W; DKD gets temperature T with α and β multiplied by W (kdcache: kd_weight times W).
    The CE weight is left as it is. Upstream ignores the two numbers without the flag; they are refused here instead.
    """
    if not logit_stand:
        if base_temp is not None or kd_weight is not None:
            raise KdcacheError(
                "--base-temp and --kd-weight of an LS command take effect only with --logit-stand: add it or drop them"
            )
        return dict(settings)
    loss = settings.get("loss", "kd")  # train-student's default loss
    if loss not in ("kd", "dkd", "mlkd"):
        return dict(settings)
    temperature = 2.0 if base_temp is None else float(base_temp)
    weight = 9.0 if kd_weight is None else float(kd_weight)
    if loss == "dkd":
        weight *= 1.0 if settings.get("kd_weight") is None else settings["kd_weight"]
    return {**settings, "logit_stand": True, "temperature": temperature, "kd_weight": weight}


# ---------------------------------------------------------------- resolving a run's settings


def is_mdistiller_file(path: str | Path) -> bool:
    """Whether ``path`` holds an mdistiller-family (yacs, upper-case sections) config rather than kdcache's form."""
    return is_yacs(read_yaml(Path(path)))


def read_yacs(data: dict, path: Path) -> dict[str, object]:
    """A yacs file's train-student settings (:func:`from_mdistiller`), its errors prefixed with the file."""
    try:
        settings = from_mdistiller(data)
    except KdcacheError as exc:
        raise KdcacheError(f"{path}: {exc}") from None
    return settings


def train_settings(config: str | Path | None = None, **given: object) -> dict[str, object]:
    """The settings of a student run, as ``train-student`` resolves them: the ``config`` file's (kdcache form or
    mdistiller/LS/MLKD yacs) with ``given`` on top; pass the result to :func:`kdcache.train_student`.

    With a yacs file, ``logit_stand=True`` with ``base_temp`` and ``kd_weight`` act as LS's ``train.py --logit-stand
    --base-temp --kd-weight``; otherwise ``base_temp`` has no meaning (use ``temperature``).
    """
    base_temp = given.pop("base_temp", None)
    yacs = config is not None and is_mdistiller_file(config)
    if config is None or not yacs or not given.get("logit_stand"):
        if base_temp is not None and not yacs:
            raise KdcacheError("--base-temp goes with an mdistiller/LS --config (as LS's train.py): use --temperature")
        if base_temp is not None:
            raise KdcacheError("--base-temp takes effect only with --logit-stand (as LS's train.py): add it or drop it")
        return resolve(TRAIN, config, given, yacs=read_yacs)
    settings = read_settings(config, TRAIN, yacs=read_yacs)
    settings = apply_ls_args(settings, True, base_temp, given.pop("kd_weight", None))  # type: ignore[arg-type]
    given.pop("logit_stand")
    return resolve(TRAIN, None, {**settings, **read_values(TRAIN, given)})
