"""The training objective, chosen once before the loop: cross-entropy plus a weighted distillation term.

The term is a registered loss (``kdcache losses`` lists them) or any importable
``package.module:function`` taking ``(student_logits, teacher_logits, labels,
**options)``. :class:`Objective` holds the chosen function, its options and the
epoch-dependent pieces (DKD's warm-up, a CTKD temperature), so a step never
branches on the loss name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from kdcache.errors import KdcacheError
from kdcache.losses.functions import CTKDTemperature, sort_teacher
from kdcache.losses.registry import LOSS_REGISTRY, LossFn, LossSpec
from kdcache.settings import TRAIN_DEFAULTS as T
from kdcache.settings import check_options

_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``, or a ``package.module:function`` imported and wrapped as a one-view loss."""
    if not isinstance(name, str):
        raise TypeError(f"a loss is named by text (kd, dkd, ... or package.module:function), got {name!r}")
    if name in LOSS_REGISTRY:
        return LOSS_REGISTRY[name]
    if not _CALLABLE.fullmatch(name):
        raise KdcacheError(
            f"unknown --loss {name!r}: choose one of {', '.join(LOSS_REGISTRY)} (`kdcache losses`), "
            "or name your own as package.module:function"
        )
    module, attr = name.split(":")
    fn = getattr(_import_loss_module(name, module), attr, None)
    if fn is None:
        raise KdcacheError(f"--loss {name}: {module} has no {attr!r}: check the function name")
    if not callable(fn):
        raise KdcacheError(f"--loss {name}: {attr} is a {type(fn).__name__}, not a function")
    defaults = {"ce_weight": 1.0, "kd_weight": 1.0, **_keyword_defaults(fn)}
    return LossSpec(name, _checked(fn, name), f"user loss {name}", defaults, builtin=False)


def _import_loss_module(name: str, module: str) -> object:
    """The module of a user loss; a module that is missing or fails while importing is one line naming it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise KdcacheError(f"--loss {name}: cannot import {module} ({exc}): put it on PYTHONPATH") from None
        raise KdcacheError(
            f"--loss {name}: {module} needs {exc.name!r}, which is not installed: pip install it"
        ) from None
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else module
        raise KdcacheError(f"--loss {name}: {module} does not import (SyntaxError at {where}: {exc.msg})") from None
    except Exception as exc:
        raise KdcacheError(
            f"--loss {name}: importing {module} raised {type(exc).__name__}: {_first_line(exc)}: fix the module"
        ) from None


def _first_line(exc: BaseException) -> str:
    """An exception's first line, saying how many more it had (a loss's own message may be long)."""
    lines = [x for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
    more = f" (+{len(lines) - 1} more lines: call the function yourself to read them)" if len(lines) > 1 else ""
    return lines[0][:200] + more


def _keyword_defaults(fn: LossFn) -> dict[str, object]:
    """The keyword options of a user loss that have defaults (shown by ``kdcache losses``, recorded per run)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[3:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _checked(fn: LossFn, name: str) -> LossFn:
    """``fn`` with its result checked: a finite scalar tensor, or a one-line error naming the loss."""

    @functools.wraps(fn)
    def call(student, teacher, labels, **options):
        try:
            value = fn(student, teacher, labels, **options)
        except Exception as exc:
            given = ", ".join(f"--loss-opt {k}={v!r}" for k, v in options.items())
            with_opts = f" (with {given})" if given else ""
            raise KdcacheError(
                f"--loss {name} raised {type(exc).__name__}{with_opts}: {_first_line(exc)}: fix the function"
                + (" or the option values" if given else "")
            ) from None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise KdcacheError(f"--loss {name} returned {what}, not a scalar tensor: reduce it (e.g. .mean())")
        if torch.is_grad_enabled() and student.requires_grad and not value.requires_grad:
            raise KdcacheError(
                f"--loss {name} returned a tensor without gradient (detached, or computed without the student's "
                "logits): the student would learn nothing; compute it from the student argument"
            )
        if not torch.isfinite(value.detach()).all():
            raise KdcacheError(f"--loss {name} returned {float(value.detach())}: it must be finite for every batch")
        return value.reshape(())

    return call


def parse_loss_opts(items: Iterable[str] | dict[str, object] | None) -> dict[str, object]:
    """``--loss-opt name=value`` pairs as a dict, each value read as a YAML scalar (``2``, ``0.5``, ``true``)."""
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, object] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise KdcacheError(f"--loss-opt takes name=value (e.g. --loss-opt margin=0.5), not {item!r}")
        name = key.strip().replace("-", "_")
        if name in out:
            raise KdcacheError(f"--loss-opt {name} is given twice: keep one")
        out[name] = yaml.safe_load(value) if value.strip() else None
    return out


def check_loss_opts(spec: LossSpec, opts: dict[str, object]) -> None:
    """Refuse ``--loss-opt`` names the loss does not take, naming them."""
    if not opts:
        return
    if spec.builtin:
        raise KdcacheError(
            f"--loss-opt is for losses of your own; --loss {spec.name} takes its options as flags "
            f"({', '.join('--' + o.replace('_', '-') for o in spec.options) or 'none'})"
        )
    assert spec.fn is not None  # only the built-in "ce" has no function
    params = inspect.signature(spec.fn).parameters  # the user's function, through functools.wraps
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(opts) - set(list(params)[3:]))
    if unknown:
        raise KdcacheError(
            f"--loss {spec.name} takes no option {', '.join(unknown)}: its options are "
            f"{', '.join(list(params)[3:]) or 'none'}"
        )


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mixed: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Cross-entropy; a mixed view's label is the λ-weighted pair (sample, partner) ``mixed = (partner_labels, λ)``."""
    if mixed is None:
        return F.cross_entropy(logits, labels)
    partner, lam = mixed
    per_row = lam * F.cross_entropy(logits, labels, reduction="none")
    return (per_row + (1 - lam) * F.cross_entropy(logits, partner, reduction="none")).mean()


class Objective(torch.nn.Module):
    """``ce_weight · CE + w(epoch) · kd_weight · term(student, teacher, labels, **options)``.

    ``w`` is DKD's warm-up ``min(epoch / warmup, 1)`` for losses that have one (1
    otherwise). ``teacher_fix="sort"`` gives the target class the teacher's
    largest logit first (Sort). With ``ctkd`` the temperature option is CTKD's
    learned temperature of the epoch; its parameters are this module's.
    """

    def __init__(
        self,
        spec: LossSpec,
        options: dict[str, object],
        ce_weight: float,
        kd_weight: float,
        warmup: int | None = 0,
        teacher_fix: str = T.teacher_fix,
        ctkd: CTKDTemperature | None = None,
    ):
        super().__init__()
        self.spec, self.options, self.ce_weight, self.kd_weight = spec, options, ce_weight, kd_weight
        self.warmup, self.sort, self.ctkd = (warmup if spec.warmup else 0), teacher_fix == "sort", ctkd

    def forward(
        self,
        student: list[torch.Tensor],
        teacher: list,
        labels: torch.Tensor,
        epoch: int,
        mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss of a step at 1-based ``epoch`` and its unweighted parts (``ce``, ``kd``)."""
        ce = cross_entropy(student[0], labels, mixed)
        for extra in student[1 : self.spec.kinds]:
            ce = ce + F.cross_entropy(extra, labels)
        if self.spec.fn is None:
            return self.ce_weight * ce, {"ce": ce}
        if self.sort:
            teacher = [sort_teacher(t, labels) for t in teacher]
        options = {**self.options, "temperature": self.ctkd(epoch)} if self.ctkd is not None else self.options
        s, t = (student[0], teacher[0]) if self.spec.kinds == 1 else (student, teacher)
        term = self.spec.fn(s, t, labels, **options)
        weight = (min(epoch / self.warmup, 1.0) if self.warmup else 1.0) * self.kd_weight
        return self.ce_weight * ce + weight * term, {"ce": ce, "kd": term}

    @classmethod
    def create(
        cls,
        loss: str,
        *,
        logit_stand: bool = T.logit_stand,
        teacher_fix: str = T.teacher_fix,
        ctkd: CTKDTemperature | None = None,
        **overrides: object,
    ) -> Objective:
        """``loss`` with its registered defaults (as ``kdcache losses`` lists them), any of them overridden.

        ``Objective.create("dkd", logit_stand=True, beta=2)`` is what ``train-student --loss dkd --logit-stand
        --beta 2`` trains with, warm-up included.
        """
        spec = get_loss(loss)
        check_options({"logit_stand": logit_stand, "teacher_fix": teacher_fix, **overrides})
        # Mixed option values; the weights and the warm-up are numbers.
        values: dict[str, Any] = {**spec.resolved_defaults(logit_stand), **overrides}
        unknown = sorted(set(overrides) - set(spec.defaults)) if spec.builtin else []
        if unknown:
            raise KdcacheError(f"--loss {loss} takes no option {unknown[0]}: it takes {', '.join(spec.defaults)}")
        if "logit_stand" in spec.defaults:
            values["logit_stand"] = logit_stand
        options = (
            {k: values[k] for k in spec.options}
            if spec.builtin
            else {k: v for k, v in values.items() if k not in ("ce_weight", "kd_weight")}
        )
        warmup = int(values.get("warmup", 0))
        return cls(spec, options, float(values["ce_weight"]), float(values["kd_weight"]), warmup, teacher_fix, ctkd)

    def temperature(self, epoch: int) -> float | None:
        """CTKD's learned temperature at ``epoch`` (None without CTKD), for the metrics."""
        return None if self.ctkd is None else self.ctkd(epoch).detach().item()
