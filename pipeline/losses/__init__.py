"""Distillation losses: the formulas (functions), the registry of built-in terms and their defaults (registry), and the
Objective a run builds once (objective).
"""

from kdcache.losses.functions import (
    CTKDTemperature,
    dkd_loss,
    kd_loss,
    mlkd_loss,
    nkd_loss,
    normkd_loss,
    sort_teacher,
    zscore,
)
from kdcache.losses.objective import Objective, cross_entropy, get_loss
from kdcache.losses.registry import LOSS_REGISTRY, LossSpec, register_loss

__all__ = [
    "LOSS_REGISTRY",
    "CTKDTemperature",
    "LossSpec",
    "Objective",
    "cross_entropy",
    "dkd_loss",
    "get_loss",
    "kd_loss",
    "mlkd_loss",
    "nkd_loss",
    "normkd_loss",
    "register_loss",
    "sort_teacher",
    "zscore",
]
