"""Logit distillation losses, computed in float32 from raw (cached) logits.

Every function casts its inputs to float32 before any softmax, std or log, so
float16 caches are safe, and returns the distillation term *before* the outer
KD weight (the trainer adds cross-entropy and weights). Reductions follow the
mdistiller family: KL summed over classes, averaged over the batch, times the
squared temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MLKD_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # added to the base temperature T0


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-row ``(x - mean) / (std + eps)`` with the unbiased std (ddof=1), as the released LS code does."""
    x = logits.float()
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)


def _prep(student: torch.Tensor, teacher: torch.Tensor, logit_stand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logit_stand:
        return zscore(student), zscore(teacher)
    return student.float(), teacher.float()


def _kl_rows(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_t || p_s) from log-probabilities."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, logit_stand: bool = False) -> torch.Tensor:
    """Hinton KD: ``τ² · mean_b KL(softmax(t/τ) ‖ softmax(s/τ))``.

    With ``logit_stand`` both logits are Z-scored first, each with its own
    statistics; the student's are not detached (LS, CVPR 2024).
    """
    s, t = _prep(student, teacher, logit_stand)
    kl = _kl_rows(F.log_softmax(t / temperature, dim=1), F.log_softmax(s / temperature, dim=1))
    return kl.mean() * temperature**2


def _binary_log(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log [p_target, p_non-target] per row, computed in log space (finite for any logit gap)."""
    lse = torch.logsumexp(logits, dim=1)
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf"))
    return torch.stack([tgt - lse, torch.logsumexp(others, dim=1) - lse], dim=1)


def _non_target_log_softmax(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log-softmax over the non-target classes (target column removed)."""
    k = logits.shape[1]
    keep = torch.ones_like(logits, dtype=torch.bool).scatter(1, target[:, None], False)
    return F.log_softmax(logits[keep].view(-1, k - 1), dim=1)


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
             temperature: float, logit_stand: bool = False) -> torch.Tensor:
    """Decoupled KD: ``α·TCKD + β·NCKD``, each ``τ²`` times the batch-mean KL.

    TCKD compares the binary (target, non-target) distributions and NCKD the
    distributions over non-target classes. Unlike the published code, the
    binary masses come from log-sum-exp, so the loss stays finite when the
    non-target mass underflows. With one non-target class NCKD is 0.
    """
    s, t = _prep(student, teacher, logit_stand)
    s, t = s / temperature, t / temperature
    tckd = _kl_rows(_binary_log(t, target), _binary_log(s, target)).mean()
    if s.shape[1] > 2:
        nckd = _kl_rows(_non_target_log_softmax(t, target), _non_target_log_softmax(s, target)).mean()
    else:
        nckd = s.new_zeros(())
    return (alpha * tckd + beta * nckd) * temperature**2


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


def mlkd_loss(student_weak: torch.Tensor, student_strong: torch.Tensor, teacher_weak: torch.Tensor,
              teacher_strong: torch.Tensor, temperature: float, logit_stand: bool = False,
              variant: str = "reference") -> torch.Tensor:
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
    sw, ss, tw, ts = (x.float() for x in (student_weak, student_strong, teacher_weak, teacher_strong))
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
