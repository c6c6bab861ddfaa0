"""TrainConfig: the hyper-parameters of a student run, resolved once against the loss's published defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kdcache.errors import KdcacheError
from kdcache.losses.functions import CTKD_DECAYS
from kdcache.losses.objective import check_loss_opts, get_loss
from kdcache.losses.registry import LossSpec
from kdcache.settings import check_options

TEACHER_FIXES = ("none", "sort")


AMP_MODES = ("none", "bf16", "fp16")


SLOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


#: Per-loss options; a run's record compares only those its loss uses.
LOSS_OPTIONS = ("temperature", "alpha", "beta", "warmup", "gamma", "t_norm", "mlkd_variant")


_FALLBACK = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20, "gamma": 1.5, "t_norm": 2.0}


@dataclass
class TrainConfig:
    """Hyper-parameters of a student run; ``None`` means the published CIFAR-100 default for the loss."""

    student: str
    loss: str = "kd"
    loss_opt: dict[str, object] = field(default_factory=dict)
    logit_stand: bool = False
    temperature: float | None = None
    ce_weight: float | None = None
    kd_weight: float | None = None
    alpha: float | None = None
    beta: float | None = None
    warmup: int | None = None
    mlkd_variant: str = "reference"
    gamma: float | None = None
    t_norm: float | None = None
    teacher_fix: str = "none"
    ctkd: bool = False
    ctkd_t_start: float = 1.0
    ctkd_t_end: float = 20.0
    ctkd_decay: str = "cosine"
    ctkd_decay_epochs: int = 10
    ctkd_decay_max: float = 0.0
    ctkd_decay_min: float = -1.0
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None
    lr_milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay_rate: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False

    @property
    def spec(self) -> LossSpec:
        """The loss's registry entry (a user ``module:function`` is imported)."""
        return get_loss(self.loss)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the loss's published default (``kdcache losses`` lists them)."""
        spec = self.spec
        d = {"ce_weight": 1.0, "kd_weight": 0.0, **_FALLBACK, **spec.resolved_defaults(self.logit_stand)}
        d = {k: v for k, v in d.items() if k not in ("logit_stand", "mlkd_variant") and hasattr(self, k)}
        slow = self.student in SLOW_LR_STUDENTS
        d["lr"] = (0.01 if slow else 0.025) if spec.kinds == 2 else (0.01 if slow else 0.05)
        values = {k: (getattr(self, k) if getattr(self, k) is not None else d[k]) for k in d}
        loss_opt = {} if spec.builtin else {**{k: spec.defaults[k] for k in spec.options}, **self.loss_opt}
        return dataclasses.replace(self, **values, loss_opt=loss_opt, lr_milestones=tuple(self.lr_milestones))

    def validate(self) -> None:
        """Refuse nonsense settings with a one-line message naming the flag."""
        check_options({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        choices = [("mlkd-variant", ("reference", "paper")), ("teacher-fix", TEACHER_FIXES)]
        for name, allowed in [*choices, ("ctkd-decay", CTKD_DECAYS), ("amp", AMP_MODES)]:
            value = getattr(self, name.replace("-", "_"))
            if value not in allowed:
                raise KdcacheError(f"unknown --{name} {value!r}: choose one of {', '.join(allowed)}")
        spec = self.spec
        check_loss_opts(spec, self.loss_opt)
        if self.ctkd and not spec.ctkd:
            raise KdcacheError(f"--ctkd works with --loss kd or dkd (with or without --logit-stand), not {self.loss}")
