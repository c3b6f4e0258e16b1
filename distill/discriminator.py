"""MEAL V2 discriminator on the C-dimensional outputs, with two modes and its own optimiser.

Architecture
    An MLP ``C -> h1 -> h2 -> 2`` with ReLU after the two hidden layers and **no ReLU on the
    final logits**.  The official code (``models/discriminator.py``) is the same stack written as
    1x1 convolutions with K=8, but it applies a ReLU to the output too: a logit clamped at >= 0
    can never drive ``BCEWithLogits`` below log 2 for an element whose target is 0, so half of
    the elements are stuck at >= log 2 and the reported D-loss plateaus.  Widths:
    ``h1 = max(C // 8, 8)``, ``h2 = max(h1 // 8, 4)``; for C >= 256 these are the official
    widths exactly (1000 -> 125 -> 15 -> 2).  The floors only matter for small C (C=10 would
    otherwise give 1 -> 0): a 1-unit ReLU layer dies easily and kills every gradient, and the
    floors cost nothing.  nn.Linear is used instead of 1x1 conv (same maths; the state_dict keys
    differ, official checkpoints of D are not loadable and need not be).

Inputs and labels
    D sees probability vectors: the stored teacher vectors (detached) and ``softmax(student
    logits)`` computed in float32.  (The official code feeds the student's *logits* and the
    teacher ensemble's averaged *logits*; offline we only store averaged softmax vectors, so both
    sides are probabilities here, which keeps the two inputs on the same footing.)
    D outputs 2 logits per sample and is trained with ``binary_cross_entropy_with_logits``
    against one-hot targets, mean over all 2*(2B) elements, exactly as the official
    ``discriminatorLoss``: the student rows come first with target ``[1, 0]`` (index 0 =
    "student" / fake) and the teacher rows follow with target ``[0, 1]`` (index 1 = "teacher" /
    real).  D runs in float32 with autocast disabled (it is tiny; BCE on fp16 logits is not).

Modes (``--discriminator``)
    ``meal-v2``      faithful: the BCE is simply added to the student's loss, so one backward
                     makes D *and* the student minimise the same BCE (a regulariser, not a GAN).
    ``adversarial``  a gradient-reversal layer sits between ``softmax(student)`` and D: the same
                     single backward trains D to minimise the BCE and the student to maximise it
                     (its gradient through the D-term is ``-grl_lambda`` times the meal-v2 one).
    ``off``          no discriminator; the returned terms are zeros.

Usage in a training step (one forward, one backward, two optimisers)::

    dloss = DiscriminatorLoss(num_classes, mode=args.discriminator).to(device)
    opt_s = SGD(student.parameters(), ...); sched = ...(opt_s)    # student only
    opt_d = make_discriminator_optimizer(dloss, lr=args.d_lr)     # None when mode == "off"
    ...
    logits = student(x)
    loss = distill_loss(logits, p)
    terms = dloss(logits, p)
    (loss + terms.d_term).backward()
    opt_s.step(); opt_d.step(); opt_s.zero_grad(); opt_d.zero_grad(); sched.step()

``d_term`` is the single tensor that carries both D's gradient and the student's gradient;
do not also backpropagate ``d_loss`` (it is a detached copy for logging).  Under DDP, D's
gradients must be all-reduced too (wrap ``DiscriminatorLoss``/its discriminator in DDP).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODES",
    "D_OPTIMIZERS",
    "DEFAULT_D_LR",
    "DEFAULT_D_OPTIMIZER",
    "Discriminator",
    "DiscriminatorLoss",
    "DiscriminatorTerms",
    "GradReverse",
    "grad_reverse",
    "discriminator_widths",
    "make_discriminator_optimizer",
]

MODES = ("meal-v2", "adversarial", "off")
D_OPTIMIZERS = ("adam", "sgd")

# Defaults of ``mealkd distill --d-optimizer`` / ``--d-lr`` (the CLI reads these).
# ``DEFAULT_D_LR`` is a float literal or the word "student" (follow the student's lr).
DEFAULT_D_OPTIMIZER = "adam"
DEFAULT_D_LR = "1e-4"

STUDENT_INDEX = 0  # column of D's output / one-hot target meaning "student" (fake)
TEACHER_INDEX = 1  # column meaning "teacher" (real)


def discriminator_widths(num_classes: int) -> tuple[int, int]:
    """Hidden widths ``(h1, h2)`` for a C-class discriminator (see module docstring)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    h1 = max(num_classes // 8, 8)
    h2 = max(h1 // 8, 4)
    return h1, h2


class Discriminator(nn.Module):
    """``Linear(C, h1) - ReLU - Linear(h1, h2) - ReLU - Linear(h2, 2)``; raw logits out."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        h1, h2 = discriminator_widths(num_classes)
        self.num_classes = num_classes
        self.fc1 = nn.Linear(num_classes, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, 2)

    def forward(self, probs: Tensor) -> Tensor:
        h = F.relu(self.fc1(probs))
        h = F.relu(self.fc2(h))
        return self.fc3(h)  # no ReLU here: see module docstring


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda``."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:  # type: ignore[override]
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return grad_output.neg() * ctx.lambd, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    return GradReverse.apply(x, float(lambd))


class DiscriminatorTerms(NamedTuple):
    """Result of :class:`DiscriminatorLoss`.

    ``d_loss``: detached float32 BCE of D on this batch (what D minimises; for logging).
    ``d_term``: ``weight * BCE`` with the graph attached; add it to the student's loss and do
    ONE backward: D's parameters receive the gradient of the BCE (both modes) and the student
    receives the same gradient (``meal-v2``) or its reversal times ``grl_lambda``
    (``adversarial``).  Zero (no graph) when the mode is ``off``.
    ``d_acc``: detached fraction of the 2B inputs D classifies correctly.
    """

    d_loss: Tensor
    d_term: Tensor
    d_acc: Tensor


class DiscriminatorLoss(nn.Module):
    """Owns the discriminator and computes the D-term for one batch.

    Args:
        num_classes: C, the width of the student output / stored vectors.
        mode: ``meal-v2`` | ``adversarial`` | ``off``.
        weight: multiplies the BCE in ``d_term`` (official: 1).
        grl_lambda: scale of the reversed gradient reaching the student (adversarial only).
        topk: K when the teacher rows come from a ``topk:K`` store (None for a dense store).
    """

    def __init__(
        self,
        num_classes: int,
        mode: str = "meal-v2",
        weight: float = 1.0,
        grl_lambda: float = 1.0,
        topk: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"discriminator mode must be one of {MODES}, got {mode!r}")
        if weight < 0 or grl_lambda < 0:
            raise ValueError("weight and grl_lambda must be >= 0")
        self.mode = mode
        self.num_classes = num_classes
        self.weight = float(weight)
        self.grl_lambda = float(grl_lambda)
        if topk is not None and not (1 <= int(topk) < num_classes):
            raise ValueError(f"topk must be in [1, num_classes), got {topk}")
        self.topk: Optional[int] = None if topk is None else int(topk)
        self.discriminator: Optional[Discriminator] = (
            None if mode == "off" else Discriminator(num_classes)
        )

    @property
    def enabled(self) -> bool:
        return self.discriminator is not None

    @staticmethod
    def targets(batch: int, device: torch.device) -> Tensor:
        """One-hot BCE targets for ``cat([student, teacher])`` rows: (2B, 2) float32."""
        t = torch.zeros(2 * batch, 2, dtype=torch.float32, device=device)
        t[:batch, STUDENT_INDEX] = 1.0
        t[batch:, TEACHER_INDEX] = 1.0
        return t

    def forward(self, student_logits: Tensor, teacher_probs: Tensor) -> DiscriminatorTerms:
        if student_logits.dim() != 2 or teacher_probs.shape != student_logits.shape:
            raise ValueError(
                f"expected matching (B, C) tensors, got {tuple(student_logits.shape)} "
                f"and {tuple(teacher_probs.shape)}"
            )
        device = student_logits.device
        if self.discriminator is None:
            zero = torch.zeros((), dtype=torch.float32, device=device)
            return DiscriminatorTerms(zero, zero, zero)

        batch = student_logits.shape[0]
        with torch.autocast(device_type=device.type, enabled=False):
            student_probs = F.softmax(student_logits.float(), dim=1)
            if self.mode == "adversarial":
                student_probs = grad_reverse(student_probs, self.grl_lambda)
            inputs = torch.cat([student_probs, teacher_probs.detach().float()], dim=0)
            out = self.discriminator(inputs)
            target = self.targets(batch, device)
            bce = F.binary_cross_entropy_with_logits(out.float(), target)
        with torch.no_grad():
            acc = (out.argmax(dim=1) == target.argmax(dim=1)).float().mean()
        return DiscriminatorTerms(d_loss=bce.detach(), d_term=self.weight * bce, d_acc=acc)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, weight={self.weight}, grl_lambda={self.grl_lambda}"


def make_discriminator_optimizer(
    disc: Union[nn.Module, Iterable[nn.Parameter], None],
    lr: float = 1e-4,
    kind: str = "adam",
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.5, 0.999),
) -> Optional[torch.optim.Optimizer]:
    """A separate optimiser for the discriminator (``--d-lr``, default 1e-4).

    It is deliberately its own ``Optimizer`` object rather than a param group of the student's
    optimiser: LR schedulers (and ``for g in opt.param_groups: g['lr'] = ...`` loops, the
    official code's bug) only ever see the student's optimiser, so D's lr stays at ``lr``.

    ``kind="adam"`` (default): Adam(lr, betas=(0.5, 0.999)), no weight decay.  D's inputs are
    probability vectors whose entries are mostly ~1e-4..1e-3 over C=1000 classes, so the raw
    gradients of its first layer are tiny and badly scaled; Adam's per-parameter normalisation
    makes lr=1e-4 mean a predictable step size, and beta1=0.5 is the usual choice for a
    discriminator chasing a moving target.  ``kind="sgd"``: SGD(lr, momentum=0.9), the official
    optimiser type, for faithful reproduction.

    Accepts a :class:`Discriminator`, a :class:`DiscriminatorLoss` or an iterable of
    parameters; returns None when there is nothing to optimise (mode ``off``).
    """
    if disc is None:
        return None
    params = list(disc.parameters() if isinstance(disc, nn.Module) else disc)
    if not params:
        return None
    if lr <= 0:
        raise ValueError(f"discriminator lr must be > 0, got {lr}")
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    raise ValueError(f"unknown discriminator optimizer kind {kind!r} (adam|sgd)")
