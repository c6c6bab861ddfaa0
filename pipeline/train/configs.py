"""YAML config files for ``dump-logits`` and ``train-student``: kdcache's own form and the mdistiller yacs form.

kdcache's form is a flat mapping of flag names (``kd-weight: 9``). The yacs form is the one of
megvii-research/mdistiller and its forks logit-standardization-KD (LS) and Multi-Level-Logit-Distillation (MLKD):
upper-case sections (``DISTILLER``, ``SOLVER``, ``KD``, ...). It is translated to the settings upstream would train
with, its defaults filled in from upstream's ``mdistiller/engine/cfg.py``. A key kdcache cannot honour is refused by
name, never ignored.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Collection
from pathlib import Path

import yaml

from kdcache.errors import KdcacheError, first_line

# ---------------------------------------------------------------- value kinds


def _as_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("an integer")


def _as_float(value: object) -> float:
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as text
        with contextlib.suppress(ValueError):
            number = float(value)
    if math.isfinite(number):
        return number
    raise ValueError("a finite number")


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("true or false")


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("text (quote it)")


def _as_text_or_int(value: object) -> str | int:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError("text or an integer")


def _as_milestones(value: object) -> tuple[int, ...]:
    try:
        if isinstance(value, str):
            return tuple(int(x) for x in value.split(",") if x.strip())
        return tuple(_as_int(x) for x in (value if isinstance(value, list) else [value]))
    except ValueError:
        raise ValueError("epochs such as [150, 180, 210] or '150,180,210'") from None


def _as_caches(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return list(value)
    raise ValueError("a store path or a list of them")


def _as_weights(value: object) -> str | list[float]:
    if isinstance(value, str):
        return value
    try:
        if isinstance(value, list) and value:
            return [_as_float(x) for x in value]
    except ValueError:
        pass
    raise ValueError("weights such as [0.5, 0.5] or '0.5,0.5'")


def _as_scalar(value: object) -> object:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError("a single value")


_INTS = "epochs batch_size warmup seed workers view_seed forward_block cache_views ctkd_decay_epochs local_cluster"
_FLOATS = (
    "temperature ce_weight kd_weight alpha beta gamma t_norm ctkd_t_start ctkd_t_end ctkd_decay_max ctkd_decay_min "
    "lr lr_decay_rate weight_decay momentum mix_alpha"
)
_BOOLS = "logit_stand ctkd download resume verify_views plot overwrite progress channels_last compile"
_TEXTS = (
    "cache_scratch student teacher loss dataset data_root out checkpoint weights augment mix device teacher_mix "
    "mlkd_variant teacher_fix ctkd_decay view_schedule split amp dtype format scheduler"
)


def _as_loss_opts(value: object) -> dict[str, object]:
    """``loss-opt``: a mapping of option names to YAML values (as ``config.yaml`` writes it)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("a mapping such as {margin: 0.5}")
    return dict(value)


# How a kdcache-form value is read, per option; an option not listed takes any single value as is.
_KINDS: dict[str, Callable[[object], object]] = {
    **dict.fromkeys(_INTS.split(), _as_int),
    **dict.fromkeys(_FLOATS.split(), _as_float),
    **dict.fromkeys(_BOOLS.split(), _as_bool),
    **dict.fromkeys(_TEXTS.split(), _as_text),
    "views": _as_text_or_int,
    "cache_memory": _as_text_or_int,
    "lr_milestones": _as_milestones,
    "cache": _as_caches,
    "teacher_weights": _as_weights,
    "loss_opt": _as_loss_opts,
}

# ---------------------------------------------------------------- reading files


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """The file's top-level mapping, or a one-line error for a missing, unreadable or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KdcacheError(f"config file {path} not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KdcacheError(f"cannot read config file {path} ({first_line(exc)}): pass a UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise KdcacheError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise KdcacheError(f"{path}: the top level must be a mapping of flag: value lines, but it is {got}")
    return data


def _is_yacs(data: dict) -> bool:
    return any(isinstance(k, str) and k.isupper() for k in data)


def is_mdistiller_file(path: str | Path) -> bool:
    """Whether ``path`` holds an mdistiller-family (yacs, upper-case sections) config rather than kdcache's form."""
    return _is_yacs(read_yaml(Path(path)))


def load_config(path: str | Path, command: str, options: Collection[str]) -> dict[str, object]:
    """Read a config file for ``command`` into ``{python_option_name: value}``; any bad key or value is refused.

    ``options`` are the python parameter names ``command`` accepts. An mdistiller-family (yacs) file is translated
    with :func:`from_mdistiller`; it describes a student run, so only ``train-student`` takes it.
    """
    path = Path(path)
    data = read_yaml(path)
    if not _is_yacs(data):
        return parse_settings(data, command, options, path)
    if command != "train-student":
        raise KdcacheError(
            f"{path} is an mdistiller config (upper-case sections), which describes a student run: "
            f"use it with train-student, not {command}"
        )
    lower = [k for k in data if not (isinstance(k, str) and k.isupper())]
    if lower:
        raise KdcacheError(f"{path} mixes mdistiller sections with kdcache keys ({lower[0]!r}): use one form per file")
    try:
        settings = from_mdistiller(data)
    except KdcacheError as exc:
        raise KdcacheError(f"{path}: {exc}") from None
    missing = sorted(set(settings) - set(options))
    if missing:
        flag = missing[0].replace("_", "-")
        raise KdcacheError(f"{path} needs the train-student option --{flag}, which this kdcache lacks: upgrade kdcache")
    return settings


def parse_settings(data: dict, command: str, options: Collection[str], path: str | Path) -> dict[str, object]:
    """Flag-named keys to python names, each value checked and normalised for its option (``path`` names the source)."""
    flags = {name.replace("_", "-"): name for name in options}
    settings: dict[str, object] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in flags:
            raise KdcacheError(f"{path}: {_unknown_flag(key, flags, command)}")
        if value is None:
            raise KdcacheError(f"{path}: {key} has no value: give one or delete the line")
        name = flags[key]
        try:
            settings[name] = _KINDS.get(name, _as_scalar)(value)
        except ValueError as exc:
            raise KdcacheError(f"{path}: {key} takes {exc}, got {value!r}") from None
    return settings


def _unknown_flag(key: object, flags: dict[str, str], command: str) -> str:
    """Why ``key`` is refused, with the flag name the user probably meant."""
    if not isinstance(key, str):
        return f"key {key!r} is not a flag name: write {command} flag names such as epochs"
    dashed = key.lstrip("-").replace("_", "-")
    if dashed in flags:
        return f"write {dashed}, the flag name, not {key}"
    close = difflib.get_close_matches(dashed, list(flags), n=1)
    hint = f"did you mean {close[0]}?" if close else f"see `kdcache {command} --help` for the flags"
    return f"unknown key {key!r} for {command}: {hint}"


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
_BY_TYPE = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_text, tuple: _as_milestones}
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
    kind = given.get("DISTILLER.TYPE", "NONE")
    _check_type(kind)
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


def _check_type(kind: object) -> None:
    """Refuse a distiller kdcache does not train, by name."""
    if isinstance(kind, str) and kind in _LOSSES:
        return
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
    dataset = values["DATASET.TYPE"]
    loss = _LOSSES[kind]
    settings: dict[str, object] = {
        "loss": loss,
        "dataset": dataset,
        "student": _model_name("DISTILLER.STUDENT", values["DISTILLER.STUDENT"], dataset),
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
        settings["teacher"] = _model_name("DISTILLER.TEACHER", values["DISTILLER.TEACHER"], dataset)
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


# ---------------------------------------------------------------- writing and merging


def dump_config(settings: dict[str, object], path: str | Path) -> Path:
    """Write ``settings`` (python names) as a kdcache-form YAML file that :func:`load_config` reads back.

    Keys become flag names in sorted order; tuples become lists; ``None`` (an option left to its default) is omitted.
    """
    path = Path(path)
    data = {name.replace("_", "-"): _plain(value) for name, value in sorted(settings.items()) if value is not None}
    try:
        text = yaml.safe_dump(data, sort_keys=True, default_flow_style=None)
    except yaml.YAMLError as exc:
        raise KdcacheError(f"cannot write these settings as YAML ({first_line(exc)}): pass plain values") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _plain(value: object) -> object:
    """A value as YAML writes it and :func:`load_config` reads it back: tuples as lists, paths as text."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


def merge(file_values: dict, given: dict) -> dict:
    """The file's settings with the command line's on top: ``given`` holds only the options the user typed."""
    return {**file_values, **given}
