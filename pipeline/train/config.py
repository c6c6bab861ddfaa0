"""TrainConfig: the hyper-parameters of a student run, resolved once against the loss's published defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.losses.objective import check_loss_opts, get_loss
from kdcache.losses.registry import LossSpec
from kdcache.settings import TRAIN_DEFAULTS as T
from kdcache.settings import check_options

SLOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
#: Published CIFAR-100 learning rates: (one view kind, MLKD's two), for most students and for SLOW_LR_STUDENTS.
LEARNING_RATES = {"default": (0.05, 0.025), "slow": (0.01, 0.01)}
#: Per-loss options; a run's record compares only those its loss uses.
LOSS_OPTIONS = ("temperature", "alpha", "beta", "warmup", "gamma", "t_norm", "mlkd_variant")


#: The CIFAR-100 recipe's LR milestones, for its 240 epochs (mdistiller's SOLVER.LR_DECAY_STAGES).
RECIPE_MILESTONES = (150, 180, 210)


def default_milestones(epochs: int) -> tuple[int, ...]:
    """The recipe's milestones for a run of ``epochs``: as published from 240 epochs on, else at the same fractions of
    the run, so a short run's LR decays too."""
    if epochs >= TrainConfig.epochs:
        return RECIPE_MILESTONES
    return tuple(max(1, round(m * epochs / TrainConfig.epochs)) for m in RECIPE_MILESTONES)


def default_lr(student: str, kinds: int) -> float:
    """The published learning rate for ``student`` with a loss of ``kinds`` view kinds."""
    rates = LEARNING_RATES["slow" if student in SLOW_LR_STUDENTS else "default"]
    return rates[kinds - 1]


@dataclass
class TrainConfig:
    """Hyper-parameters of a student run (defaults: the settings table); ``None`` means the loss's published
    CIFAR-100 default, from the loss registry."""

    student: str
    loss: str = T.loss
    loss_opt: dict[str, object] = field(default_factory=dict)
    logit_stand: bool = T.logit_stand
    temperature: float | None = T.temperature
    ce_weight: float | None = T.ce_weight
    kd_weight: float | None = T.kd_weight
    alpha: float | None = T.alpha
    beta: float | None = T.beta
    warmup: int | None = T.warmup
    mlkd_variant: str = T.mlkd_variant
    gamma: float | None = T.gamma
    t_norm: float | None = T.t_norm
    teacher_fix: str = T.teacher_fix
    ctkd: bool = T.ctkd
    ctkd_t_start: float = T.ctkd_t_start
    ctkd_t_end: float = T.ctkd_t_end
    ctkd_decay: str = T.ctkd_decay
    ctkd_decay_epochs: int = T.ctkd_decay_epochs
    ctkd_decay_max: float = T.ctkd_decay_max
    ctkd_decay_min: float = T.ctkd_decay_min
    epochs: int = T.epochs
    batch_size: int = T.batch_size
    lr: float | None = T.lr
    lr_milestones: tuple[int, ...] | None = T.lr_milestones
    lr_decay_rate: float = T.lr_decay_rate
    weight_decay: float = T.weight_decay
    momentum: float = T.momentum
    seed: int = T.seed
    amp: str = T.amp
    channels_last: bool = T.channels_last
    compile: bool = T.compile

    @classmethod
    def from_file(cls, path: str | Path, **overrides: object) -> TrainConfig:
        """The hyper-parameters of a kdcache or mdistiller/LS/MLKD config file, ``overrides`` on top, resolved
        exactly as ``train-student --config`` resolves them (the file's other settings are left out)."""
        from kdcache.train.configs import train_settings

        settings = train_settings(path, **overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: v for k, v in settings.items() if k in names}  # read by the table's readers
        return cls(**values)

    @property
    def spec(self) -> LossSpec:
        """The loss's registry entry (a user ``module:function`` is imported)."""
        return get_loss(self.loss)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the loss's published default (``kdcache losses`` lists them)."""
        spec = self.spec
        d = spec.resolved_defaults(self.logit_stand)
        d = {k: v for k, v in d.items() if k not in ("logit_stand", "mlkd_variant") and hasattr(self, k)}
        d["lr"] = default_lr(self.student, spec.kinds)
        values: dict[str, Any] = {k: (getattr(self, k) if getattr(self, k) is not None else d[k]) for k in d}
        loss_opt = {} if spec.builtin else {**{k: spec.defaults[k] for k in spec.options}, **self.loss_opt}
        milestones = default_milestones(self.epochs) if self.lr_milestones is None else tuple(self.lr_milestones)
        return dataclasses.replace(self, **values, loss_opt=loss_opt, lr_milestones=milestones)

    def validate(self) -> None:
        """Refuse nonsense settings with a one-line message naming the flag."""
        check_options({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        spec = self.spec
        check_loss_opts(spec, self.loss_opt)
        if self.ctkd and not spec.with_ctkd:
            raise KdcacheError(f"--ctkd works with --loss kd or dkd (with or without --logit-stand), not {self.loss}")
