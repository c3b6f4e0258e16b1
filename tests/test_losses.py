"""Tests for distill.losses (real torch computations, CPU); the discriminator's are in test_discriminator.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mealkd.distill.discriminator import DiscriminatorLoss
from mealkd.distill.losses import (
    DistillLoss,
    kl_to_targets,
    soft_cross_entropy,
    target_entropy,
    teacher_agreement,
)

LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
PROBS = [[0.1, 0.2, 0.7], [0.6, 0.4, 0.0]]


def _hand_log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _hand_softmax(row):
    return [math.exp(v) for v in _hand_log_softmax(row)]


# ---------------------------------------------------------------- soft cross-entropy


def test_soft_ce_matches_hand_computation():
    expected = 0.0
    for z, p in zip(LOGITS, PROBS):
        ls = _hand_log_softmax(z)
        expected += -sum(pi * li for pi, li in zip(p, ls))
    expected /= len(LOGITS)
    got = soft_cross_entropy(torch.tensor(LOGITS), torch.tensor(PROBS))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # the numbers written out: lse(1,2,3) = 3.4076059644, lse(0.5,-1,0) = 1.1041306053
    # row 1: 0.1*2.4076059644 + 0.2*1.4076059644 + 0.7*0.4076059644 = 0.8076059644
    # row 2: 0.6*(1.1041306053-0.5) + 0.4*(1.1041306053+1) + 0 = 1.2041306053
    assert expected == pytest.approx((0.8076059644 + 1.2041306053) / 2, abs=1e-9)
    assert got.item() == pytest.approx(1.0058682849, abs=1e-6)


def test_kl_is_ce_minus_entropy_and_zero_at_fit():
    z, p = torch.tensor(LOGITS), torch.tensor(PROBS)
    h = 0.0
    for row in PROBS:
        h += -sum(v * math.log(v) for v in row if v > 0)
    h /= len(PROBS)
    assert target_entropy(p).item() == pytest.approx(h, abs=1e-6)
    assert kl_to_targets(z, p).item() == pytest.approx(soft_cross_entropy(z, p).item() - h, abs=1e-6)
    q = torch.tensor([[0.2, 0.3, 0.5], [0.25, 0.25, 0.5]])
    assert kl_to_targets(q.log(), q).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_ce_with_one_hot_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    p = F.one_hot(y, 10).float()
    assert soft_cross_entropy(z, p).item() == pytest.approx(F.cross_entropy(z, y).item(), abs=1e-6)


def test_soft_ce_gradient_is_softmax_minus_p_over_batch():
    z = torch.tensor(LOGITS, requires_grad=True)
    p = torch.tensor(PROBS, requires_grad=True)  # must be treated as a constant
    soft_cross_entropy(z, p).backward()
    expected = torch.tensor(
        [[(s - pi) / len(LOGITS) for s, pi in zip(_hand_softmax(r), q)] for r, q in zip(LOGITS, PROBS)]
    )
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert p.grad is None


def test_soft_ce_decreases_fitting_fixed_soft_targets():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    targets = F.softmax(torch.randn(32, 5) * 2, dim=1)
    model = torch.nn.Linear(8, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        loss = soft_cross_entropy(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
    # never below the entropy floor
    assert losses[-1] >= target_entropy(targets).item() - 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_ce_low_precision_logits_give_finite_float32(dtype):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(8, 1000, generator=g) * 20).to(dtype)
    z[0, 0] = 6e4 if dtype == torch.float16 else 1e30  # near the top of the range
    z.requires_grad_(True)
    p = F.softmax(torch.randn(8, 1000, generator=g), dim=1).to(dtype)
    loss = soft_cross_entropy(z, p)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = soft_cross_entropy(z.detach().float(), p.float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()
    assert kl_to_targets(z, p).dtype == torch.float32


def test_soft_ce_under_cpu_autocast_is_float32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10)
    x = torch.randn(4, 16)
    p = F.softmax(torch.randn(4, 10), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        loss = soft_cross_entropy(z, p)
        terms = DiscriminatorLoss(10, mode="meal-v2")(z, p)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert terms.d_term.dtype == torch.float32 and torch.isfinite(terms.d_term)


def test_soft_ce_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- DistillLoss / agreement


def test_distill_loss_hard_label_weight():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 4, generator=g)
    p = F.softmax(torch.randn(6, 4, generator=g), dim=1)
    y = torch.randint(0, 4, (6,), generator=g)
    soft = soft_cross_entropy(z, p).item()
    assert DistillLoss()(z, p).item() == pytest.approx(soft, abs=1e-7)
    assert DistillLoss()(z, p, y).item() == pytest.approx(soft, abs=1e-7)  # ignored at weight 0
    w = 0.3
    parts = DistillLoss(w).parts(z, p, y)
    assert parts.soft.item() == pytest.approx(soft, abs=1e-7)
    assert parts.total.item() == pytest.approx(soft + w * F.cross_entropy(z, y).item(), abs=1e-6)
    with pytest.raises(ValueError):
        DistillLoss(w)(z, p)
    with pytest.raises(ValueError):
        DistillLoss(-1.0)


def test_teacher_agreement():
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    p = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.0, 0.1, 0.9], [0.2, 0.7, 0.1]])
    a = teacher_agreement(z, p)
    assert a.dtype == torch.float32 and a.item() == pytest.approx(0.5)
