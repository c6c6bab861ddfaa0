"""Logit distillation losses, computed in float32 (or float64) from raw (cached) logits.

Every function casts half-precision inputs to float32 before any softmax, std
or log, so float16 caches are safe (float64 inputs stay float64, for reference
checks), and returns the distillation term *before* the outer KD weight (the
trainer adds cross-entropy and weights). Reductions follow the mdistiller
family: KL summed over classes, averaged over the batch, times the squared
temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcache.settings import TRAIN_DEFAULTS as T
from kdcache.settings import choices
from kdcache.store.formats import TAILS, TopKTeacher, buckets

MLKD_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # added to the base temperature T0
CTKD_DECAYS = choices("ctkd_decay")
_LOG_HALF = -math.log(2.0)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in float64 when it already is."""
    return x if x.dtype == torch.float64 else x.float()


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-row ``(x - mean) / (std + eps)`` with the unbiased std (ddof=1), as the released LS code does."""
    x = _upcast(logits)
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)


def _prep(student: torch.Tensor, teacher: torch.Tensor, logit_stand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logit_stand:
        return zscore(student), zscore(teacher)
    return _upcast(student), _upcast(teacher)


def _kl_rows(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_t || p_s) from log-probabilities."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float | torch.Tensor, logit_stand: bool = T.logit_stand
) -> torch.Tensor:
    """Hinton KD: ``τ² · mean_b KL(softmax(t/τ) ‖ softmax(s/τ))``.

    With ``logit_stand`` both logits are Z-scored first, each with its own
    statistics; the student's are not detached (LS, CVPR 2024).
    """
    s, t = _prep(student, teacher, logit_stand)
    kl = _kl_rows(F.log_softmax(t / temperature, dim=1), F.log_softmax(s / temperature, dim=1))
    return kl.mean() * temperature**2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``: ``log1p(−exp(x))`` below −log 2, ``log(−expm1(x))`` above (Mächler 2012).

    Each branch sees its input clamped to its own side, so the discarded one stays finite and ``torch.where`` passes
    no NaN gradient.
    """
    low = torch.log1p(-torch.exp(x.clamp(max=_LOG_HALF)))
    high = torch.log(-torch.expm1(x.clamp(min=_LOG_HALF)))
    return torch.where(x < _LOG_HALF, low, high)


def _binary_log(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log [p_target, p_non-target] per row, finite for any logit gap and accurate however small either mass is.

    A difference of log-sum-exps is accurate only for the smaller of the two masses (≤ ½); the larger one is
    :func:`_log1mexp` of it. So ``log(1 − p_t)`` keeps full precision when p_t is tiny, and ``log p_t`` when the
    non-target mass is.
    """
    lse = torch.logsumexp(logits, dim=1)
    log_t = logits.gather(1, target[:, None]).squeeze(1) - lse
    log_o = torch.logsumexp(logits.scatter(1, target[:, None], float("-inf")), dim=1) - lse
    target_smaller = log_t <= log_o
    larger = _log1mexp(torch.minimum(log_t, log_o))
    return torch.stack([torch.where(target_smaller, log_t, larger), torch.where(target_smaller, larger, log_o)], dim=1)


def _non_target_log_softmax(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log-softmax over the non-target classes (target column removed)."""
    k = logits.shape[1]
    keep = torch.ones_like(logits, dtype=torch.bool).scatter(1, target[:, None], False)
    return F.log_softmax(logits[keep].view(-1, k - 1), dim=1)


def _dkd_rows(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row TCKD and NCKD KLs of already tempered logits; NCKD is 0 with one non-target class."""
    tckd = _kl_rows(_binary_log(t, target), _binary_log(s, target))
    if s.shape[1] <= 2:
        return tckd, torch.zeros_like(tckd)
    return tckd, _kl_rows(_non_target_log_softmax(t, target), _non_target_log_softmax(s, target))


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float | torch.Tensor,
    logit_stand: bool = T.logit_stand,
) -> torch.Tensor:
    """Decoupled KD: ``α·TCKD + β·NCKD``, each ``τ²`` times the batch-mean KL.

    TCKD compares the binary (target, non-target) distributions and NCKD the
    distributions over non-target classes. Unlike the published code, the
    binary masses come from log-sum-exp and log1mexp, so the loss stays finite
    when the non-target mass underflows and accurate when the target mass is tiny.
    With one non-target class NCKD is 0. ``temperature`` may be a tensor (CTKD).
    """
    s, t = _prep(student, teacher, logit_stand)
    tckd, nckd = _dkd_rows(s / temperature, t / temperature, target)
    return (alpha * tckd.mean() + beta * nckd.mean()) * temperature**2


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"unknown tail model {tail!r}: choose 'uniform' or 'bucket'")


def topk_kd_loss(
    student: torch.Tensor,
    teacher: TopKTeacher,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    logit_stand: bool = T.logit_stand,
    tail: str = "bucket",
) -> torch.Tensor:
    """:func:`kd_loss` against a top-K cache: KL over the kept, target and tail buckets (plus, for ``tail="uniform"``,
    the teacher's tail mass times the student's divergence from uniform inside the tail), ``τ²`` times the batch
    mean."""
    _check_tail(tail)
    s_b, t_b, _, within = buckets(student, teacher, target, temperature, logit_stand)
    log_t = F.log_softmax(t_b, dim=1)
    kl = _kl_rows(log_t, F.log_softmax(s_b, dim=1))
    if tail == "uniform":
        kl = kl + log_t[:, -1].exp() * within
    return kl.mean() * temperature**2


def topk_dkd_loss(
    student: torch.Tensor,
    teacher: TopKTeacher,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float | torch.Tensor,
    logit_stand: bool = T.logit_stand,
    tail: str = "bucket",
) -> torch.Tensor:
    """:func:`dkd_loss` against a top-K cache: TCKD is exact up to the tail estimate (the target logit is stored);
    NCKD compares the non-target buckets (kept classes and the tail), with the within-tail term as in
    :func:`topk_kd_loss`."""
    _check_tail(tail)
    s_b, t_b, slot, within = buckets(student, teacher, target, temperature, logit_stand)
    tckd = _kl_rows(_binary_log(t_b, slot), _binary_log(s_b, slot))
    log_t_nt = _non_target_log_softmax(t_b, slot)
    nckd = _kl_rows(log_t_nt, _non_target_log_softmax(s_b, slot))
    if tail == "uniform":
        nckd = nckd + log_t_nt[:, -1].exp() * within
    return (alpha * tckd.mean() + beta * nckd.mean()) * temperature**2


def _class_correlation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    ps, pt = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    return ((pt.T @ pt - ps.T @ ps) ** 2).sum() / student.shape[1]


def _batch_correlation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    ps, pt = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    return ((pt @ pt.T - ps @ ps.T) ** 2).sum() / student.shape[0]


def _median_masks(teacher_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLKD's confidence masks: samples / classes at or below the batch median confidence (linear interpolation)."""
    p = F.softmax(teacher_weak, dim=1)
    conf = p.max(dim=1).values
    class_conf = p.sum(dim=0)
    return conf <= torch.quantile(conf, 0.5), class_conf <= torch.quantile(class_conf, 0.5)


def mlkd_loss(
    student_weak: torch.Tensor,
    student_strong: torch.Tensor,
    teacher_weak: torch.Tensor,
    teacher_strong: torch.Tensor,
    temperature: float,
    logit_stand: bool = T.logit_stand,
    variant: str = "reference",
) -> torch.Tensor:
    """Multi-level logit distillation (MLKD, CVPR 2023), optionally with LS Z-scores on the instance terms.

    ``variant="reference"`` is what the released MLKD (+LS) code computes,
    published numbers included: temperatures S = {T, 3, 5, 2, 6}; instance KD on
    the weak view at every τ in S, times the fraction of the low-confidence
    mask (exactly ½ for an even batch: the code multiplies an already reduced
    scalar by the mask); instance KD on the strong view at T, 3 and 5 plus two
    more weak-view terms at 2 and 6 (the code's copy-paste); class and batch
    correlation on the weak view only, also times the mask fractions, with no
    τ² and no Z-score.

    ``variant="paper"`` is what the paper describes: per-sample masks on the
    instance and batch terms and per-class masks on the class term applied
    before reduction, and the strong view distilled at all five temperatures.
    """
    if variant not in ("reference", "paper"):
        raise ValueError(f"unknown MLKD variant {variant!r}: choose 'reference' or 'paper'")
    sw, ss, tw, ts = (_upcast(x) for x in (student_weak, student_strong, teacher_weak, teacher_strong))
    temps = (float(temperature), *MLKD_TEMPERATURES)
    sample_mask, class_mask = _median_masks(tw)
    if variant == "reference":
        fs, fc = sample_mask.float().mean(), class_mask.float().mean()
        total = sw.new_zeros(())
        for tau in temps:
            total = total + fs * kd_loss(sw, tw, tau, logit_stand)
            total = total + fc * _class_correlation(sw, tw, tau) + fs * _batch_correlation(sw, tw, tau)
        for tau in temps[:3]:
            total = total + kd_loss(ss, ts, tau, logit_stand)
        for tau in temps[3:]:
            total = total + kd_loss(sw, tw, tau, logit_stand)
        return total
    m = sample_mask.float()
    total = sw.new_zeros(())
    for tau in temps:
        a, b = _prep(sw, tw, logit_stand)
        kl = _kl_rows(F.log_softmax(b / tau, dim=1), F.log_softmax(a / tau, dim=1)) * tau**2
        total = total + (kl * m).mean()
        total = total + kd_loss(ss, ts, tau, logit_stand)
        ps, pt = F.softmax(sw / tau, dim=1), F.softmax(tw / tau, dim=1)
        cc = ((pt.T @ pt - ps.T @ ps) ** 2).sum(dim=1) * class_mask.float()
        bc = ((pt @ pt.T - ps @ ps.T) ** 2).sum(dim=1) * m
        total = total + cc.sum() / sw.shape[1] + bc.sum() / sw.shape[0]
    return total


def nkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> torch.Tensor:
    """Normalized KD (NKD, ICCV 2023): ``-q_y·log p_y`` at T=1 (q_y detached) plus ``γ·τ²`` times the
    cross-entropy between teacher and student distributions over the non-target classes at ``τ``.

    The second term is a cross-entropy, not a KL: it never reaches 0 (it carries
    the teacher's non-target entropy), so do not monitor it as a distance.
    """
    s, t = _upcast(student), _upcast(teacher)
    idx = target[:, None]
    log_p_y = F.log_softmax(s, dim=1).gather(1, idx).squeeze(1)
    q_y = F.softmax(t, dim=1).gather(1, idx).squeeze(1).detach()
    target_term = -(q_y * log_p_y).mean()
    log_ps = _non_target_log_softmax(s / temperature, target)
    qt = _non_target_log_softmax(t / temperature, target).exp()
    non_target = -(qt * log_ps).sum(dim=1).mean()
    return target_term + gamma * temperature**2 * non_target


def _norm_temperature(logits: torch.Tensor, t_norm: float) -> torch.Tensor:
    """NormKD's per-sample temperature ``t_norm·(std + 1e-7)`` (unbiased std), shape (B, 1), not detached."""
    return t_norm * (logits.std(dim=1, keepdim=True) + 1e-7)


def normkd_loss(student: torch.Tensor, teacher: torch.Tensor, t_norm: float) -> torch.Tensor:
    """NormKD: per-sample temperatures ``t_norm·(std + 1e-7)`` (unbiased std), one for the teacher
    and one for the student, and a KL weighted per sample by the squared teacher temperature, batch mean.

    The published code has no eps and gives NaN for a constant row; 1e-7 keeps it finite.
    """
    s, t = _upcast(student), _upcast(teacher)
    ts, tt = _norm_temperature(s, t_norm), _norm_temperature(t, t_norm)
    kl = _kl_rows(F.log_softmax(t / tt, dim=1), F.log_softmax(s / ts, dim=1))
    return (kl * tt.squeeze(1) ** 2).mean()


def normkd_dkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, t_norm: float
) -> torch.Tensor:
    """NormKD with DKD (NormKD_W_DKD): ``α·TCKD + β·NCKD`` on logits divided by per-sample temperatures.

    The teacher is divided by ``T_t = t_norm·(std_t + 1e-7)`` and the student by
    its own ``T_s = t_norm·(std_s + 1e-7)`` (not detached); both terms of a row
    are weighted by ``T_t²`` (the teacher's, no global τ²), then the batch mean.
    The eps is :func:`normkd_loss`'s.
    """
    s, t = _upcast(student), _upcast(teacher)
    tt = _norm_temperature(t, t_norm)
    tckd, nckd = _dkd_rows(s / _norm_temperature(s, t_norm), t / tt, target)
    return ((alpha * tckd + beta * nckd) * tt.squeeze(1) ** 2).mean()


def sort_teacher(teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The parameter-free Sort fix of teacher logits (Limantoro, IEEE SPL 2025).

    The target class receives the largest logit value, classes that ranked above
    it move down one place, the rest stay; the multiset of values (so the mean
    and std) is unchanged, which is why it composes with Z-score and NormKD.
    ``[5, 1, 3, 4, 2]`` with target 2 becomes ``[4, 1, 5, 3, 2]``.
    """
    t = _upcast(teacher)
    boosted = t.scatter(1, target[:, None], float("inf"))
    order = torch.sort(boosted, dim=1, descending=True, stable=True).indices
    values = torch.sort(t, dim=1, descending=True).values
    return torch.empty_like(t).scatter_(1, order, values)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.lam * grad, None


class CTKDTemperature(torch.nn.Module):
    """CTKD's learnable global temperature ``T = t_start + t_end·sigmoid(θ)``, θ initialised to 1.

    θ is trained adversarially: its gradient passes a reversal layer scaled by
    λ, which follows CTKD's curriculum :meth:`lam` of the 1-based epoch (by
    default cosine from ``decay_max`` 0 to ``decay_min`` −1 over ``curriculum``
    10 epochs, the values of CTKD's CIFAR script), so θ ascends the KD loss.
    Put its parameters in the student's optimizer.
    """

    def __init__(
        self,
        t_start: float = 1.0,
        t_end: float = 20.0,
        curriculum: int = 10,
        decay: str = "cosine",
        decay_max: float = 0.0,
        decay_min: float = -1.0,
    ):
        super().__init__()
        if decay not in CTKD_DECAYS:
            raise ValueError(f"unknown CTKD decay {decay!r}: choose 'cosine' or 'linear'")
        if curriculum < 1:
            raise ValueError(f"the CTKD curriculum needs at least 1 epoch, got {curriculum}")
        self.t_start, self.t_end, self.curriculum = t_start, t_end, curriculum
        self.decay, self.decay_max, self.decay_min = decay, decay_max, decay_min
        self.theta = torch.nn.Parameter(torch.ones(1))

    def lam(self, epoch: int) -> float:
        """λ at 1-based ``epoch``, as CTKD's ``CosineDecay`` / ``LinearDecay.get_value(epoch)`` with n = curriculum.

        cosine: ``min + (max − min)·(1 + cos(π·e/n))/2``, e clipped to [0, n], so λ(n) = min.
        linear: ``−e·(max − min)/n``, e clipped to [0, n − 1]: upstream ignores the max offset and stops one step
        short of min.
        """
        n = self.curriculum
        if self.decay == "linear":
            return -min(max(epoch, 0), n - 1) * (self.decay_max - self.decay_min) / n
        e = min(max(epoch, 0), n)
        return self.decay_min + (self.decay_max - self.decay_min) * (1 + math.cos(math.pi * e / n)) / 2

    def forward(self, epoch: int) -> torch.Tensor:
        """The temperature for 1-based ``epoch`` (a 0-d tensor), with λ(epoch) on θ's gradient."""
        theta = _GradReverse.apply(self.theta, self.lam(epoch))
        return self.t_start + self.t_end * torch.sigmoid(theta).squeeze()
