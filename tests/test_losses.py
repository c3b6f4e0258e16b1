"""Tests for distill.losses and distill.discriminator (real torch computations, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.discriminator import (
    Discriminator,
    DiscriminatorLoss,
    discriminator_widths,
    grad_reverse,
    make_discriminator_optimizer,
)
from distill.losses import (
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


# ---------------------------------------------------------------- discriminator


def test_discriminator_widths():
    assert discriminator_widths(1000) == (125, 15)
    d = Discriminator(1000)
    assert (d.fc1.out_features, d.fc2.out_features, d.fc3.out_features) == (125, 15, 2)
    assert discriminator_widths(10) == (8, 4)
    assert Discriminator(10)(torch.rand(3, 10)).shape == (3, 2)


def test_discriminator_output_can_be_negative():
    torch.manual_seed(0)
    d = Discriminator(10)
    with torch.no_grad():
        d.fc3.bias.fill_(-5.0)
    assert (d(torch.rand(4, 10)) < 0).all()


def _separable_batch(n, c, gen):
    cls = torch.randint(0, c, (n,), generator=gen)
    teacher = F.softmax(F.one_hot(cls, c).float() * 6 + 0.1 * torch.randn(n, c, generator=gen), dim=1)
    student_logits = 0.1 * torch.randn(n, c, generator=gen)  # nearly flat after softmax
    return student_logits, teacher


def test_discriminator_bce_falls_well_below_log2():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    c = 10
    dl = DiscriminatorLoss(c, mode="meal-v2")
    opt = make_discriminator_optimizer(dl, lr=1e-2)
    first = None
    for _ in range(300):
        s, t = _separable_batch(32, c, gen)
        terms = dl(s, t)
        opt.zero_grad()
        terms.d_term.backward()
        opt.step()
        if first is None:
            first = terms.d_loss.item()
    assert first == pytest.approx(math.log(2), abs=0.15)
    # With a ReLU on the final logits the mean BCE could not go below log(2)/2 ~ 0.347.
    assert terms.d_loss.item() < 0.05
    assert terms.d_acc.item() == 1.0


def _d_term_grads(mode, grl_lambda, state, s_logits, teacher):
    dl = DiscriminatorLoss(s_logits.shape[1], mode=mode, grl_lambda=grl_lambda)
    dl.discriminator.load_state_dict(state)
    z = s_logits.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    terms = dl(z, t)
    terms.d_term.backward()
    assert t.grad is None  # teacher vectors are detached
    return z.grad, [p.grad.clone() for p in dl.discriminator.parameters()], terms


@pytest.mark.parametrize("lam", [1.0, 0.25])
def test_adversarial_gradient_is_negative_lambda_times_meal_v2(lam):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    c = 20
    state = Discriminator(c).state_dict()
    s, t = _separable_batch(8, c, gen)
    s = s * 20  # make the student softmax non-flat so the gradient is not negligible
    g_meal, dg_meal, terms_meal = _d_term_grads("meal-v2", 1.0, state, s, t)
    g_adv, dg_adv, terms_adv = _d_term_grads("adversarial", lam, state, s, t)
    assert g_meal.abs().max() > 1e-6
    assert torch.allclose(g_adv, -lam * g_meal, atol=1e-9, rtol=1e-6)
    # D itself is trained identically (minimises the BCE) in both modes
    for a, b in zip(dg_meal, dg_adv):
        assert torch.equal(a, b)
    assert terms_meal.d_loss.item() == terms_adv.d_loss.item()


def test_meal_v2_student_gradient_is_plain_bce_gradient():
    torch.manual_seed(0)
    c, b = 12, 5
    dl = DiscriminatorLoss(c, mode="meal-v2", weight=0.7)
    z = (torch.randn(b, c) * 3).requires_grad_(True)
    t = F.softmax(torch.randn(b, c) * 3, dim=1)
    dl(z, t).d_term.backward()
    z2 = z.detach().clone().requires_grad_(True)
    out = dl.discriminator(torch.cat([F.softmax(z2, dim=1), t]))
    target = torch.tensor([[1.0, 0.0]] * b + [[0.0, 1.0]] * b)  # student first, label [1, 0]
    (0.7 * F.binary_cross_entropy_with_logits(out, target)).backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-7)


def test_grad_reverse_layer():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(3, 4)).sum().backward()
    assert torch.equal(x.grad, -0.5 * torch.arange(12.0).view(3, 4))


def test_off_mode():
    dl = DiscriminatorLoss(10, mode="off")
    assert not dl.enabled and make_discriminator_optimizer(dl) is None
    terms = dl(torch.randn(2, 10, requires_grad=True), torch.rand(2, 10))
    assert terms.d_term.item() == 0.0 and not terms.d_term.requires_grad
    with pytest.raises(ValueError):
        DiscriminatorLoss(10, mode="gan")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_student_schedule_never_touches_discriminator_lr(kind):
    d_lr = 1e-4
    student = torch.nn.Linear(4, 10)
    dl = DiscriminatorLoss(10)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    opt_d = make_discriminator_optimizer(dl, lr=d_lr, kind=kind)
    assert opt_d is not opt_s
    s_ids = {id(p) for g in opt_s.param_groups for p in g["params"]}
    assert not s_ids & {id(p) for p in dl.parameters()}
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt_s,
        [
            torch.optim.lr_scheduler.LinearLR(opt_s, start_factor=0.1, total_iters=5),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=200),
        ],
        milestones=[5],
    )
    x, p = torch.randn(8, 4), F.softmax(torch.randn(8, 10), dim=1)
    for step in range(300):
        logits = student(x)
        loss = soft_cross_entropy(logits, p) + dl(logits, p).d_term
        opt_s.zero_grad()
        opt_d.zero_grad()
        loss.backward()
        opt_s.step()
        opt_d.step()
        sched.step()
        if step % 50 == 0:  # the official code's manual overwrite loop
            for g in opt_s.param_groups:
                g["lr"] = 0.05
    assert opt_s.param_groups[0]["lr"] != pytest.approx(0.1)
    assert [g["lr"] for g in opt_d.param_groups] == [d_lr]
