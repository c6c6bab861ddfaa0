import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses.functions import CTKDTemperature, kd_loss, nkd_loss, normkd_loss, sort_teacher, zscore


def test_sort_example_and_properties():
    t = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0]])
    assert sort_teacher(t, torch.tensor([2])).tolist() == [[4.0, 1.0, 5.0, 3.0, 2.0]]
    assert sort_teacher(t, torch.tensor([0])).tolist() == t.tolist()  # already correct: unchanged
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 100, generator=g), torch.randint(0, 100, (16,), generator=g)
    s = sort_teacher(x, y)
    assert torch.equal(s.argmax(1), y)
    assert torch.equal(torch.sort(s, 1).values, torch.sort(x, 1).values)  # same multiset, so same mean and std
    assert torch.allclose(zscore(s).sort(1).values, zscore(x).sort(1).values)


def test_nkd_hand_computed():
    s = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])  # teacher (0.5, 0.25, 0.25)
    y = torch.tensor([0])
    target = -0.5 * math.log(1 / 3)
    non_target = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5))  # both renormalized to (1/2, 1/2)
    assert nkd_loss(s, t, y, 1.0, 1.5).item() == pytest.approx(target + 1.5 * non_target, rel=1e-6)
    assert nkd_loss(s, t, y, 2.0, 1.5).item() == pytest.approx(target + 1.5 * 4 * non_target, rel=1e-6)


def test_normkd_hand_computed_and_finite_on_constant_rows():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g) * 3
    tt = 2.0 * (t.std(1, keepdim=True) + 1e-7)
    ts = 2.0 * (s.std(1, keepdim=True) + 1e-7)
    pt = F.softmax(t / tt, 1)
    want = ((pt * (F.log_softmax(t / tt, 1) - F.log_softmax(s / ts, 1))).sum(1) * tt.squeeze(1) ** 2).mean()
    assert normkd_loss(s, t, 2.0).item() == pytest.approx(want.item(), rel=1e-6)
    assert normkd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(normkd_loss(torch.zeros(2, 10), t[:2], 2.0))


def test_nkd_and_normkd_compose_with_zscore():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 20, generator=g), torch.randn(8, 20, generator=g)
    y = torch.randint(0, 20, (8,), generator=g)
    a = normkd_loss(zscore(s), zscore(t), 2.0)
    b = normkd_loss(zscore(s), zscore(5 * t + 1), 2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    assert torch.isfinite(nkd_loss(zscore(s), zscore(sort_teacher(t, y)), y, 1.0, 1.5))


def test_ctkd_temperature_and_gradient_reversal():
    ctkd = CTKDTemperature(1.0, 20.0)
    assert ctkd.lam(0) == 0.0 and ctkd.lam(10) == pytest.approx(-1.0) and ctkd.lam(5) == pytest.approx(-0.5)
    assert ctkd(0).detach().item() == pytest.approx(1 + 20 * torch.sigmoid(torch.tensor(1.0)).item())
    s, t = torch.randn(4, 10), torch.randn(4, 10) * 3
    temp = ctkd(10)
    kd_loss(s, t, temp).backward()
    reversed_grad = ctkd.theta.grad.clone()
    ctkd.theta.grad = None
    plain = 1 + 20 * torch.sigmoid(ctkd.theta)
    kd_loss(s, t, plain.squeeze()).backward()
    assert torch.allclose(reversed_grad, -ctkd.theta.grad)
