"""kdcache's DKD, NormKD-with-DKD and CTKD schedules against the published formulas, written out here in float64."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.losses.functions import CTKDTemperature, dkd_loss, normkd_dkd_loss, topk_dkd_loss
from kdcache.store.formats import LogitFormat, TopKTeacher, encode


def _binary(p: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """mdistiller's ``cat_mask``: [target mass, non-target mass] per row, summed from probabilities."""
    return torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], dim=1)


def _upstream_dkd_terms(rs: torch.Tensor, rt: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row TCKD and NCKD of tempered logits as mdistiller's ``dkd_loss`` forms them (log of summed softmax, −1000
    target mask)."""
    gt = torch.zeros_like(rs, dtype=torch.bool).scatter(1, y[:, None], True)
    bs, bt = _binary(F.softmax(rs, 1), gt), _binary(F.softmax(rt, 1), gt)
    tckd = F.kl_div(torch.log(bs), bt, reduction="none").sum(1)
    nckd = F.kl_div(F.log_softmax(rs - 1000.0 * gt, 1), F.softmax(rt - 1000.0 * gt, 1), reduction="none").sum(1)
    return tckd, nckd


def upstream_dkd(s, t, y, alpha, beta, temperature):
    """mdistiller ``DKD.dkd_loss``: sums over the batch divided by its size, times T²."""
    tckd, nckd = _upstream_dkd_terms(s / temperature, t / temperature, y)
    return (alpha * tckd.sum() + beta * nckd.sum()) * temperature**2 / y.shape[0]


def upstream_normkd_dkd(s, t, y, alpha, beta, t_norm):
    """NormKD ``NormKD_W_DKD.dkd_loss_norm``: per-sample T = t_norm·std (no eps), rows weighted by T_teacher²."""
    dyws, dywt = s.std(1, keepdim=True) * t_norm, t.std(1, keepdim=True) * t_norm
    tckd, nckd = _upstream_dkd_terms(s / dyws, t / dywt, y)
    w = dywt.squeeze(1) ** 2
    return alpha * (tckd * w).mean() + beta * (nckd * w).mean()


def _small_target_batch(shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1000 classes in float64; the student's target logit moved by ``shift`` (−3: p_t ≈ 5e-5; +16: the non-target mass
    ≈ 1e-4), the teacher close to the student, so TCKD is a small difference of nearly equal binary distributions."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(16, 1000, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (16,), generator=g)
    s[torch.arange(16), y] += shift
    t = s + 0.3 * torch.randn(16, 1000, generator=g, dtype=torch.float64)
    return s, t, y


@pytest.mark.parametrize("shift", [-3.0, 16.0])
def test_dkd_tckd_matches_upstream_when_one_mass_is_tiny(shift):
    s, t, y = _small_target_batch(shift)
    want = upstream_dkd(s, t, y, 1.0, 0.0, 1.0)
    assert float(dkd_loss(s, t, y, 1.0, 0.0, 1.0) / want - 1) == pytest.approx(0.0, abs=1e-6)
    assert float(dkd_loss(s.float(), t.float(), y, 1.0, 0.0, 1.0) / want - 1) == pytest.approx(0.0, abs=1e-4)
    s_ours, s_up = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    dkd_loss(s_ours, t, y, 1.0, 0.0, 1.0).backward()
    upstream_dkd(s_up, t, y, 1.0, 0.0, 1.0).backward()
    assert torch.allclose(s_ours.grad, s_up.grad, rtol=1e-6, atol=1e-12)


def test_dkd_matches_upstream_at_default_weights_with_gradients():
    s, t, y = _small_target_batch(-3.0, seed=1)
    s, t = s * 3, t * 3
    want = upstream_dkd(s, t, y, 1.0, 8.0, 4.0)
    assert float(dkd_loss(s, t, y, 1.0, 8.0, 4.0)) == pytest.approx(float(want), rel=1e-9)
    s_ours, s_up = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    dkd_loss(s_ours, t, y, 1.0, 8.0, 4.0).backward()
    upstream_dkd(s_up, t, y, 1.0, 8.0, 4.0).backward()
    assert torch.allclose(s_ours.grad, s_up.grad, rtol=1e-7, atol=1e-12)


def test_topk_dkd_tckd_matches_upstream_when_the_target_mass_is_tiny():
    s, t, y = _small_target_batch(-3.0)
    a = encode(t.float(), y, LogitFormat("topk", 10), np.float32)
    top = TopKTeacher(*(torch.from_numpy(a[k]) for k in ("topk_values", "topk_indices", "row_stats")), 1000)
    want = upstream_dkd(s, t.float().double(), y, 1.0, 0.0, 1.0)  # at T = 1 the bucket masses are exact
    assert float(topk_dkd_loss(s.float(), top, y, 1.0, 0.0, 1.0) / want - 1) == pytest.approx(0.0, abs=1e-4)


def test_normkd_dkd_matches_upstream_float64_with_gradients():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(32, 100, generator=g, dtype=torch.float64) * 3
    t = torch.randn(32, 100, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, 100, (32,), generator=g)
    for alpha, beta in ((1.0, 8.0), (4.0, 5.0)):
        want = upstream_normkd_dkd(s, t, y, alpha, beta, 2.0)
        assert float(normkd_dkd_loss(s, t, y, alpha, beta, 2.0)) == pytest.approx(float(want), rel=1e-6)
        assert float(normkd_dkd_loss(s.float(), t.float(), y, alpha, beta, 2.0)) == pytest.approx(float(want), rel=1e-4)
    s_ours, s_up = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    normkd_dkd_loss(s_ours, t, y, 1.0, 8.0, 2.0).backward()
    upstream_normkd_dkd(s_up, t, y, 1.0, 8.0, 2.0).backward()
    assert torch.allclose(s_ours.grad, s_up.grad, rtol=1e-5, atol=1e-7)  # through the student std; eps 1e-7 differs
    assert float(normkd_dkd_loss(t, t, y, 1.0, 8.0, 2.0)) == pytest.approx(0.0, abs=1e-9)


def upstream_cosine_decay(i: int, max_value: float, min_value: float, num_loops: int) -> float:
    """CTKD ``CosineDecay.get_value``."""
    i = min(max(i, 0), num_loops)
    return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def upstream_linear_decay(i: int, max_value: float, min_value: float, num_loops: int) -> float:
    """CTKD ``LinearDecay.get_value``."""
    i = max(i, 0)
    if i >= num_loops:
        i = num_loops - 1
    return i * -((max_value - min_value) / num_loops)


@pytest.mark.parametrize("settings", [(0.0, -1.0, 10), (0.0, -1.0, 5), (0.5, -2.0, 7)])
def test_ctkd_lambda_per_epoch_matches_upstream(settings):
    hi, lo, n = settings
    cosine = CTKDTemperature(curriculum=n, decay_max=hi, decay_min=lo)
    linear = CTKDTemperature(curriculum=n, decay="linear", decay_max=hi, decay_min=lo)
    for epoch in range(0, 16):
        assert cosine.lam(epoch) == pytest.approx(upstream_cosine_decay(epoch, hi, lo, n), abs=1e-12)
        assert linear.lam(epoch) == pytest.approx(upstream_linear_decay(epoch, hi, lo, n), abs=1e-12)


def test_ctkd_default_schedule_reaches_minus_one_at_epoch_ten():
    ctkd = CTKDTemperature()
    assert ctkd.lam(1) == pytest.approx(-0.02447174185242318, abs=1e-12)  # LS's CTKD log, epoch 1
    assert ctkd.lam(9) == pytest.approx(-0.97553, abs=1e-5)
    assert ctkd.lam(10) == pytest.approx(-1.0) and ctkd.lam(11) == pytest.approx(-1.0)
    linear = CTKDTemperature(decay="linear")
    assert linear.lam(1) == pytest.approx(-0.1) and linear.lam(10) == pytest.approx(-0.9)
    with pytest.raises(ValueError, match="decay"):
        CTKDTemperature(decay="step")


def test_ctkd_temperature_reaches_dkd_through_softmax_and_square():
    s, t, y = _small_target_batch(0.0)
    temp = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    dkd_loss(s, t, y, 1.0, 8.0, temp).backward()
    eps = 1e-3
    numeric = (dkd_loss(s, t, y, 1.0, 8.0, 3.0 + eps) - dkd_loss(s, t, y, 1.0, 8.0, 3.0 - eps)) / (2 * eps)
    assert float(temp.grad) == pytest.approx(float(numeric), rel=1e-5)
