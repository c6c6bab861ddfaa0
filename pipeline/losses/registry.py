"""The loss registry: every built-in distillation term with its published defaults, and register_loss for your own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from kdcache.errors import KdcacheError
from kdcache.losses.functions import (
    dkd_loss,
    kd_loss,
    mlkd_loss,
    nkd_loss,
    normkd_dkd_loss,
    normkd_loss,
    topk_dkd_loss,
    topk_kd_loss,
    zscore,
)
from kdcache.store.formats import TopKTeacher

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered distillation term: the function, the options it takes with their defaults, and what it needs.

    ``fn(student, teacher, labels, **options)`` returns the term before the outer KD weight; for ``kinds == 2``
    (MLKD) ``student`` and ``teacher`` are ``[weak, strong]`` lists. ``defaults`` hold the published CIFAR-100
    values (``ce_weight``, ``kd_weight`` and the options); ``ls_defaults`` override them with Z-score
    standardization. ``warmup``: DKD's ``min(epoch / warmup, 1)`` factor applies. ``topk``: works on top-K caches.
    ``mixed``: defined on mixup/CutMix views. ``with_ctkd``: CTKD may learn its temperature.
    """

    name: str
    fn: LossFn | None
    summary: str
    defaults: dict[str, object]
    ls_defaults: dict[str, object] = field(default_factory=dict)
    kinds: int = 1
    warmup: bool = False
    topk: bool = False
    mixed: bool = False
    with_ctkd: bool = False
    builtin: bool = True

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options ``fn`` takes (the defaults beside the two weights and the warm-up)."""
        return tuple(k for k in self.defaults if k not in ("ce_weight", "kd_weight", "warmup"))

    def resolved_defaults(self, logit_stand: bool) -> dict[str, object]:
        """The defaults with or without Z-score standardization; a loss without a teacher term has CE weight 1 and
        distillation weight 0."""
        return {"ce_weight": 1.0, "kd_weight": 0.0, **self.defaults, **(self.ls_defaults if logit_stand else {})}


#: Every built-in loss, by ``--loss`` name (see :func:`register_loss`).
LOSS_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str, summary: str, defaults: Mapping[str, object], *, replace: bool = False, **spec: Any
) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as ``--loss name`` (a decorator), with the defaults ``kdcache losses`` lists.

    A name already registered is refused unless ``replace=True``; ``defaults`` must map option names to values.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_loss takes the loss's name as text, got {name!r}")
    if name in LOSS_REGISTRY and not replace:
        raise KdcacheError(f"--loss {name} is already registered: choose another name or pass replace=True")
    if not isinstance(defaults, Mapping) or not all(isinstance(k, str) for k in defaults):
        raise TypeError(f"register_loss({name!r}) takes defaults as a mapping of option names, got {defaults!r}")
    unknown = sorted(set(spec) - {f.name for f in fields(LossSpec)})
    if unknown:
        raise TypeError(f"register_loss({name!r}) takes no {unknown[0]!r}")

    def wrap(fn: LossFn) -> LossFn:
        if not callable(fn):
            raise TypeError(f"register_loss({name!r}) decorates a function, not a {type(fn).__name__}")
        LOSS_REGISTRY[name] = LossSpec(name, fn, summary, dict(defaults), **spec)
        return fn

    return wrap


LOSS_REGISTRY["ce"] = LossSpec("ce", None, "cross-entropy alone (no teacher)", {"ce_weight": 1.0}, mixed=True)
_LS = {"kd_weight": 9.0, "temperature": 2.0}


@register_loss(
    "kd",
    "Hinton KD: tau^2 KL(teacher || student) at temperature tau",
    {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "logit_stand": False},
    ls_defaults=_LS,
    topk=True,
    mixed=True,
    with_ctkd=True,
)
def kd_term(student, teacher, labels, *, temperature, logit_stand):
    """:func:`kd_loss` (or :func:`topk_kd_loss` for a top-K teacher)."""
    if isinstance(teacher, TopKTeacher):
        return topk_kd_loss(student, teacher, labels, temperature, logit_stand)
    return kd_loss(student, teacher, temperature, logit_stand)


@register_loss(
    "dkd",
    "Decoupled KD (CVPR 2022): alpha TCKD + beta NCKD, warmed up over --warmup epochs",
    {"ce_weight": 1.0, "kd_weight": 1.0, "warmup": 20, "alpha": 1.0, "beta": 8.0, "temperature": 4.0}
    | {"logit_stand": False},
    ls_defaults=_LS,
    warmup=True,
    topk=True,
    with_ctkd=True,
)
def dkd_term(student, teacher, labels, *, alpha, beta, temperature, logit_stand):
    """:func:`dkd_loss` (or :func:`topk_dkd_loss` for a top-K teacher)."""
    if isinstance(teacher, TopKTeacher):
        return topk_dkd_loss(student, teacher, labels, alpha, beta, temperature, logit_stand)
    return dkd_loss(student, teacher, labels, alpha, beta, temperature, logit_stand)


@register_loss(
    "mlkd",
    "Multi-level logit distillation (CVPR 2023) on weak and strong views",
    {
        "ce_weight": 0.1,
        "kd_weight": 0.9,
        "temperature": 4.0,
        "logit_stand": False,
        "mlkd_variant": "reference",
    },
    ls_defaults=_LS,
    kinds=2,
)
def mlkd_term(student, teacher, labels, *, temperature, logit_stand, mlkd_variant):
    """:func:`mlkd_loss` of the (weak, strong) student and teacher pairs."""
    return mlkd_loss(student[0], student[1], teacher[0], teacher[1], temperature, logit_stand, mlkd_variant)


def _stand(student: torch.Tensor, teacher: torch.Tensor, logit_stand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (zscore(student), zscore(teacher)) if logit_stand else (student, teacher)


@register_loss(
    "nkd",
    "Normalized KD (ICCV 2023): target term plus gamma tau^2 normalized non-target KL",
    {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0, "gamma": 1.5, "logit_stand": False},
)
def nkd_term(student, teacher, labels, *, temperature, gamma, logit_stand):
    """:func:`nkd_loss`, on Z-scored logits with ``logit_stand``."""
    return nkd_loss(*_stand(student, teacher, logit_stand), labels, temperature, gamma)


@register_loss(
    "normkd",
    "NormKD: per-sample temperatures t_norm * std of each logit row",
    {"ce_weight": 0.1, "kd_weight": 0.9, "t_norm": 2.0, "logit_stand": False},
    ls_defaults={"kd_weight": 9.0},
)
def normkd_term(student, teacher, labels, *, t_norm, logit_stand):
    """:func:`normkd_loss`, on Z-scored logits with ``logit_stand``."""
    return normkd_loss(*_stand(student, teacher, logit_stand), t_norm)


@register_loss(
    "normkd-dkd",
    "DKD with NormKD's per-sample temperatures (NormKD_W_DKD)",
    {"ce_weight": 1.0, "kd_weight": 1.0, "warmup": 20, "alpha": 1.0, "beta": 8.0, "t_norm": 2.0, "logit_stand": False},
    ls_defaults={"kd_weight": 9.0},
    warmup=True,
)
def normkd_dkd_term(student, teacher, labels, *, alpha, beta, t_norm, logit_stand):
    """:func:`normkd_dkd_loss`, on Z-scored logits with ``logit_stand``."""
    return normkd_dkd_loss(*_stand(student, teacher, logit_stand), labels, alpha, beta, t_norm)
