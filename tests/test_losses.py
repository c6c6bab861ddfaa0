import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses.functions import dkd_loss, kd_loss, mlkd_loss, zscore


def test_zscore_uses_unbiased_std():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 3)
    assert torch.allclose(zscore(x), (x - mean) / (std + 1e-7))


def test_kd_hand_computed():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher (0.75, 0.25) at T=1
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(want, rel=1e-6)
    t2 = torch.tensor([[2 * math.log(3.0), 0.0]])  # same distribution at T=2, times T^2
    assert kd_loss(s, t2, 2.0).item() == pytest.approx(4 * want, rel=1e-6)


def test_kd_zero_when_equal_and_ls_invariant_to_teacher_shift_and_scale():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 100, generator=g), torch.randn(8, 100, generator=g) * 3
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    base = kd_loss(s, t, 2.0, logit_stand=True)
    assert kd_loss(s, 7.0 * t - 5.0, 2.0, logit_stand=True).item() == pytest.approx(base.item(), rel=1e-5)
    assert kd_loss(s, 7.0 * t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-3)


def test_ls_gradient_flows_through_student_statistics():
    s = torch.randn(4, 10, requires_grad=True)
    kd_loss(s, torch.randn(4, 10), 2.0, logit_stand=True).backward()
    # the standardized loss is invariant to the student's own shift and scale, so the gradient is orthogonal to both
    assert torch.allclose(s.grad.sum(dim=1), torch.zeros(4), atol=1e-5)
    assert torch.allclose((s.grad * s.detach()).sum(dim=1), torch.zeros(4), atol=1e-4)


def test_float16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g) * 8
    assert kd_loss(s.half(), t.half(), 1.0).dtype == torch.float32
    assert kd_loss(s.half(), t.half(), 1.0).item() == pytest.approx(kd_loss(s, t.half().float(), 1.0).item(), rel=1e-3)


def _dkd_reference(s, t, y, alpha, beta, T):
    """The published DKD formulation (masks and -1000), for comparison where it is finite."""
    gt = F.one_hot(y, s.shape[1]).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T**2
    ls = F.log_softmax(s / T - 1000.0 * gt, 1)
    lt = F.log_softmax(t / T - 1000.0 * gt, 1)
    nckd = (lt.exp() * (lt - ls)).sum(1).mean() * T**2
    return alpha * tckd + beta * nckd


def test_dkd_matches_published_formulation_and_is_zero_when_equal():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(16, 20, generator=g), torch.randn(16, 20, generator=g) * 2
    y = torch.randint(0, 20, (16,), generator=g)
    assert dkd_loss(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(
        _dkd_reference(s, t, y, 1.0, 8.0, 4.0).item(), rel=1e-4
    )
    assert dkd_loss(t, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_dkd_finite_at_logit_gap_1e4():
    s = torch.zeros(4, 10)
    s[:, 0] = 1e4
    t = torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    out = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    assert torch.isfinite(out)
    s.requires_grad_(True)
    dkd_loss(s, t, y, 1.0, 8.0, 1.0).backward()
    assert torch.isfinite(s.grad).all()
    assert not torch.isfinite(_dkd_reference(s.detach(), t, y, 1.0, 8.0, 1.0))  # the published code overflows here


def test_mlkd_reference_vs_paper():
    g = torch.Generator().manual_seed(3)
    sw, ss, tw, ts = (torch.randn(8, 10, generator=g) * 2 for _ in range(4))
    ref = mlkd_loss(sw, ss, tw, ts, 4.0)
    paper = mlkd_loss(sw, ss, tw, ts, 4.0, variant="paper")
    assert torch.isfinite(ref) and torch.isfinite(paper) and ref.item() != pytest.approx(paper.item(), rel=1e-3)
    assert mlkd_loss(tw, ts, tw, ts, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    # reference: half of every weak term at {T,3,5,2,6}, strong KD at {T,3,5}, weak KD again at {2,6}
    inst = sum(0.5 * kd_loss(sw, tw, T) for T in (4.0, 3, 5, 2, 6)) + sum(kd_loss(ss, ts, T) for T in (4.0, 3, 5))
    inst = inst + kd_loss(sw, tw, 2) + kd_loss(sw, tw, 6)
    only_instance = mlkd_loss(sw, ss, tw, ts, 4.0) - _correlations(sw, tw)
    assert only_instance.item() == pytest.approx(inst.item(), rel=1e-5)


def _correlations(sw, tw):
    total = 0.0
    for T in (4.0, 3, 5, 2, 6):
        ps, pt = F.softmax(sw / T, 1), F.softmax(tw / T, 1)
        total += 0.5 * ((pt.T @ pt - ps.T @ ps) ** 2).sum() / sw.shape[1]
        total += 0.5 * ((pt @ pt.T - ps @ ps.T) ** 2).sum() / sw.shape[0]
    return total
