"""Compact caches: the K largest teacher logits per row, plus exact row statistics and one tail bucket.

``dump-logits --format topk:K`` stores, per (view, sample), the K largest logits
with their class indices and six float32 statistics of the *full* float32
logits (:data:`STAT_FIELDS`): mean and unbiased std (so Z-score
standardization of the kept entries is exact), log-sum-exp at T = 1 (so their
probabilities are exact), the target-class logit (kept even when the target is
not in the top K, so DKD's target/non-target split is exact), and the
log-sum-exp and mean of the *tail* (every class that is neither kept nor the
target).

Stage two distills over buckets: the kept classes, the target, and one tail
bucket holding the remaining mass. Inside the tail the teacher's distribution
is unknown; ``tail="bucket"`` (the default) compares the coarse buckets only
(a lower bound of the full KL that leaves the student's tail free), and
``tail="uniform"`` takes the teacher's tail as uniform, adding the tail mass
times ``KL(uniform || student inside the tail)``. ``bench/topk_error.py``
found the bucket tail closer to the full loss's gradient once the student is
any good (the uniform tail pulls a trained student's tail towards uniform).

At T = 1 every bucket mass is exact. At another temperature the tail's mass ``sum_j exp(x_j / T)`` is not stored; it
is estimated from the tail's count ``m``, mean ``mu`` and T = 1 mass as if the
tail were Gaussian, ``log m + mu / T + s^2 / (2 T^2)`` with ``s^2`` fitted so
T = 1 is exact (exact to first order as T grows too). The student's tail is its
own exact log-sum-exp over the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdcache.errors import KdcacheError
from kdcache.settings import TRAIN_DEFAULTS as T

TAILS = ("uniform", "bucket")
STAT_FIELDS = ("mean", "std", "lse", "target", "tail_lse", "tail_mean")
MASKED = -1.0e4  # bucket logit of an empty bucket: exp() is exactly 0 in float32, and it stays finite


@dataclass(frozen=True)
class LogitFormat:
    """How a cache stores each teacher row: ``full`` logits or ``topk`` with ``k`` entries."""

    kind: str = "full"
    k: int = 0

    @property
    def is_topk(self) -> bool:
        return self.kind == "topk"

    def arrays(self) -> tuple[str, ...]:
        """Base names of the arrays that hold one kind of view's teacher outputs."""
        return ("topk_values", "topk_indices", "row_stats") if self.is_topk else ("logits",)

    def to_attrs(self) -> str:
        return f"topk:{self.k}" if self.is_topk else "full"

    def __str__(self) -> str:
        return self.to_attrs()


#: The default format: full logit rows.
FULL = LogitFormat()


def parse_format(text: str, num_classes: int | None = None) -> LogitFormat:
    """``--format`` (``full`` or ``topk:K``), checked against the number of classes when known."""
    text = str(text).strip()
    if text == "full":
        return FULL
    head, _, k = text.partition(":")
    if head != "topk" or not k.isdigit() or int(k) < 1:
        raise KdcacheError(f"unknown --format {text!r}: use full or topk:K with K a positive integer (e.g. topk:10)")
    fmt = LogitFormat("topk", int(k))
    if num_classes is not None and fmt.k > num_classes - 2:
        raise KdcacheError(
            f"--format {text} keeps too many of {num_classes} classes (at most {num_classes - 2}, so a tail "
            "remains): use a smaller K or --format full"
        )
    if num_classes is not None and num_classes > 32767:
        raise KdcacheError(
            f"--format topk stores int16 class indices; {num_classes} classes do not fit: use --format full"
        )
    return fmt


def encode(logits: torch.Tensor, targets: torch.Tensor, fmt: LogitFormat, np_dtype: type) -> dict[str, np.ndarray]:
    """One kind's teacher rows as the arrays ``fmt`` stores (statistics from the float32 logits before truncation)."""
    if not fmt.is_topk:
        return {"logits": logits.numpy().astype(np_dtype)}
    x = logits.float()
    values, indices = x.topk(fmt.k, dim=1)
    y = targets.long()[:, None]
    exact = torch.zeros_like(x, dtype=torch.bool).scatter_(1, indices, True).scatter_(1, y, True)
    tail = x.masked_fill(exact, float("-inf"))
    m = (~exact).sum(dim=1)
    stats = torch.stack(
        [
            x.mean(dim=1),
            x.std(dim=1),
            torch.logsumexp(x, dim=1),
            x.gather(1, y).squeeze(1),
            torch.logsumexp(tail, dim=1),
            x.masked_fill(exact, 0.0).sum(dim=1) / m,
        ],
        dim=1,
    )
    return {
        "topk_values": values.numpy().astype(np_dtype),
        "topk_indices": indices.numpy().astype(np.int16),
        "row_stats": stats.numpy().astype(np.float32),
    }


@dataclass
class TopKTeacher:
    """A batch of top-K teacher rows (``values``/``indices`` (B, K), ``stats`` (B, 6)) over ``num_classes``."""

    values: torch.Tensor
    indices: torch.Tensor
    stats: torch.Tensor
    num_classes: int


def buckets(
    student: torch.Tensor,
    teacher: TopKTeacher,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    logit_stand: bool = T.logit_stand,
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits over K + 2 buckets, already divided by the temperature, the target's bucket, and
    per row ``KL(uniform || student within the tail)``.

    Buckets: the K kept classes, the target (empty when it is among the kept),
    and the tail. ``softmax`` of the teacher's buckets is its distribution
    coarsened to those buckets (exact at T = 1, tail estimated otherwise); the
    student's is its own exact coarsening. With ``logit_stand`` both sides are
    Z-scored with their full-row statistics first (the teacher's are stored).
    """
    s = student.float()
    v, idx, st = teacher.values.float(), teacher.indices.long(), teacher.stats.float()
    mean, std, target_logit, tail_lse, tail_mean = st[:, 0:1], st[:, 1:2], st[:, 3:4], st[:, 4:5], st[:, 5:6]
    y = target.long()[:, None]
    in_topk = (idx == y).any(dim=1, keepdim=True)
    m = teacher.num_classes - idx.shape[1] - (~in_topk).float()
    # Tail spread fitted so that log m + mean + s2 / 2 is the stored T = 1 log-sum-exp.
    s2 = (2 * (tail_lse - torch.log(m) - tail_mean)).clamp_min(0)
    shift, scale = torch.zeros_like(mean), torch.ones_like(std)
    if logit_stand:
        shift, scale = mean, std + eps
        s = (s - s.mean(dim=1, keepdim=True)) / (s.std(dim=1, keepdim=True) + eps)
    b = scale * temperature
    t_target = torch.where(in_topk, torch.full_like(target_logit, MASKED), (target_logit - shift) / b)
    t_tail = torch.log(m) + (tail_mean - shift) / b + s2 / (2 * b**2)
    t_b = torch.cat([(v - shift) / b, t_target, t_tail], dim=1)

    s_scaled = s / temperature
    s_target = torch.where(in_topk, torch.full_like(target_logit, MASKED), s_scaled.gather(1, y))
    exact = torch.zeros_like(s_scaled, dtype=torch.bool).scatter(1, idx, True).scatter(1, y, True)
    s_tail = torch.logsumexp(s_scaled.masked_fill(exact, float("-inf")), dim=1, keepdim=True)
    s_b = torch.cat([s_scaled.gather(1, idx), s_target, s_tail], dim=1)
    # KL(uniform || student's distribution inside the tail), per row: the within-tail term for TAILS "uniform".
    within = -torch.log(m.squeeze(1)) - ((s_scaled * (~exact)).sum(dim=1) / m.squeeze(1) - s_tail.squeeze(1))
    slot = torch.where(
        in_topk.squeeze(1), (idx == y).float().argmax(dim=1), torch.full_like(y.squeeze(1), idx.shape[1])
    )
    return s_b, t_b, slot, within


def top1_and_confidence(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and max softmax probability (T = 1) per row, from either format's arrays."""
    if "logits" in arrays:
        z = arrays["logits"].astype(np.float32)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return z.argmax(axis=1), p.max(axis=1) / p.sum(axis=1)
    lse = arrays["row_stats"][:, STAT_FIELDS.index("lse")]
    return arrays["topk_indices"][:, 0].astype(np.int64), np.exp(arrays["topk_values"][:, 0].astype(np.float32) - lse)


__all__ = [
    "LogitFormat",
    "parse_format",
    "encode",
    "TopKTeacher",
    "buckets",
    "STAT_FIELDS",
    "top1_and_confidence",
    "TAILS",
]
