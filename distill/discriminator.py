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
    D sees the centred log-probabilities of two rows: the stored teacher row (detached) and the
    student's ``softmax(logits / T)`` (float32), each as ``log max(p, 2^-24)`` minus its mean over
    the classes.  The official code feeds the student's *logits* and the teacher ensemble's
    averaged *logits*; offline only the averaged softmax is stored, and the centred log of a
    softmax row is exactly its logits with softmax's free additive shift removed, so this is the
    official input as far as a store allows.  (Until 2026-11 D saw the probability rows
    themselves: on a near-one-hot row every class but one is ~0, so D's first layer sees almost
    the same input for teacher and student and its weights get almost no gradient; with
    probability input D stayed at log 2 = 0.693 and 50% accuracy on both a 10-class and a
    1000-class problem under Adam 1e-4, Adam 1e-3 and SGD at the student's lr alike -- see
    docs/benchmarks.md, "Discriminator".)  ``2^-24`` is the smallest positive float16: a stored
    value below it is 0, so both sides are floored there.

    **Same form on both sides** (``match_store``, default on).  The student's row is first put
    through the store's own encode/decode, so D cannot separate the two by a storage artefact:
    for a dense store (fp16 rows renormalised on read) the row is rounded to fp16 and
    renormalised; for a ``topk:K`` store (K fp16 values, the leftover mass spread evenly over the
    other classes: an exactly flat tail no softmax has) the row is cut to its own top K the same
    way (:func:`topk_rows`, identical to ``storage.encoding.decode_topk(encode_topk(p))``).
    Without it, D tells a top-k teacher row from any student row by the flat tail alone, and
    ``adversarial`` mode pushes the student to imitate the artefact.  The fp16 rounding is
    straight-through (identity gradient); the top-K selection passes gradient to the K kept
    values and, through the tail's ``1 - sum``, to them again.

    D outputs 2 logits per sample and is trained with ``binary_cross_entropy_with_logits``
    against one-hot targets, mean over all 2*(2B) elements, exactly as the official
    ``discriminatorLoss``: the student rows come first with target ``[1, 0]`` (index 0 =
    "student" / fake) and the teacher rows follow with target ``[0, 1]`` (index 1 = "teacher" /
    real).  D runs in float32 with autocast disabled (it is tiny; BCE on fp16 logits is not).

Optimiser (``--d-optimizer``, ``--d-lr``)
    Default Adam(lr 1e-3, betas (0.5, 0.999)), its own optimiser, never scheduled.  The official
    code puts D's parameters in the student's SGD (momentum 0.9) and resets every group's lr to
    the student's each epoch, so D effectively trains at the student's lr and schedule
    (``--d-optimizer sgd --d-lr student`` reproduces that).  Adam is the default because its
    per-parameter step does not depend on the scale of D's inputs (log-probabilities reach
    -17 over 1000 classes) or on the student's lr/schedule (a cosine schedule freezes an SGD
    D by the last epochs); at 1e-4 (the former default) D moved too little in a short run to
    leave log 2 even with log-probability input.

Modes (``--discriminator``)
    ``meal-v2``      faithful: the BCE is simply added to the student's loss, so one backward
                     makes D *and* the student minimise the same BCE (a regulariser, not a GAN).
    ``adversarial``  a gradient-reversal layer sits between ``softmax(student)`` and D: the same
                     single backward trains D to minimise the BCE and the student to maximise it
                     (its gradient through the D-term is ``-grl_lambda`` times the meal-v2 one).
    ``off``          no discriminator; the returned terms are zeros.

Usage in a training step (one forward, one backward, two optimisers)::

    dloss = DiscriminatorLoss(num_classes, mode=args.discriminator, topk=store.topk).to(device)
    opt_s = SGD(student.parameters(), ...); sched = ...(opt_s)    # student only
    opt_d = make_discriminator_optimizer(dloss, lr=d_lr, kind=args.d_optimizer)  # None if "off"
    ...
    logits = student(x)
    loss = distill_loss(logits, p)
    terms = dloss(logits / T, p)      # T: the store's softmax temperature
    (loss + terms.d_term).backward()
    opt_s.step(); opt_d.step(); opt_s.zero_grad(); opt_d.zero_grad(); sched.step()

``d_term`` is the single tensor that carries both D's gradient and the student's gradient;
do not also backpropagate ``d_loss`` (it is a detached copy for logging).  Under DDP, D's
gradients must be all-reduced too: the trainer does it once per optimiser step, in one collective
(D is not wrapped in DDP).
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
    "topk_rows",
]

MODES = ("meal-v2", "adversarial", "off")
D_OPTIMIZERS = ("adam", "sgd")

# Defaults of ``mealkd distill --d-optimizer`` / ``--d-lr`` (the CLI reads these).
# ``DEFAULT_D_LR`` is a float literal or the word "student" (follow the student's lr).
DEFAULT_D_OPTIMIZER = "adam"
DEFAULT_D_LR = "1e-3"
# What D sees (module docstring): centred log-probabilities ("logprob") or the rows ("prob", the
# former behaviour); and whether the student's row gets the store's encode/decode first.
D_INPUTS = ("prob", "logprob")
DEFAULT_D_INPUT = "logprob"
DEFAULT_MATCH_STORE = True
PROB_FLOOR = 2.0**-24  # smallest positive float16: a stored value below it is 0


def _round_f16(x: Tensor) -> Tensor:
    """``x`` rounded to float16 and back (as the store does), with an identity gradient."""
    return x + (x.to(torch.float16).float() - x).detach()


def topk_rows(probs: Tensor, k: int) -> Tensor:
    """(B, C) probability rows -> the rows a ``topk:k`` store decodes to, differentiably.

    The k largest values rounded to float16 (straight-through) at their classes, the leftover
    mass ``1 - sum`` spread evenly over the other ``C - k`` classes (an exactly flat tail); if
    fp16 rounding makes the k values sum to more than 1, the tail is 0 and they are rescaled to
    sum to 1 -- the same arithmetic as :func:`storage.encoding.decode_topk`.
    """
    c = probs.shape[1]
    vals, idx = probs.topk(k, dim=1)
    vals = _round_f16(vals)
    total = vals.sum(dim=1, keepdim=True)
    rest = (1.0 - total).clamp_min(0.0) / max(1, c - k)
    out = rest.expand(-1, c).scatter(1, idx, vals)
    return torch.where(total > 1.0, out / total, out)

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
        input: ``logprob`` (default) or ``prob`` (the former input), see the module docstring.
        match_store: give the student's row the store's encode/decode first (default True).
    """

    def __init__(
        self,
        num_classes: int,
        mode: str = "meal-v2",
        weight: float = 1.0,
        grl_lambda: float = 1.0,
        topk: int | None = None,
        input: str | None = None,
        match_store: bool | None = None,
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
        self.input = DEFAULT_D_INPUT if input is None else input
        if self.input not in D_INPUTS:
            raise ValueError(f"discriminator input must be one of {D_INPUTS}, got {self.input!r}")
        self.match_store = DEFAULT_MATCH_STORE if match_store is None else bool(match_store)
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

    def student_rows(self, student_logits: Tensor) -> Tensor:
        """``softmax(student_logits)`` in the form the store gives the teacher rows (float32).

        With ``match_store`` (default): dense stores hold fp16 rows renormalised on read, so the
        student's row is rounded to fp16 and renormalised the same way; ``topk:K`` stores hold
        the K largest values in fp16 and spread the leftover mass evenly over the other classes,
        so the student's row is cut to its own top K the same way (:func:`topk_rows`).  The fp16
        rounding is a straight-through step (its gradient is the identity)."""
        p = F.softmax(student_logits.float(), dim=1)
        if not self.match_store:
            return p
        if self.topk is not None:
            return topk_rows(p, self.topk)
        rounded = _round_f16(p)
        return rounded / rounded.sum(dim=1, keepdim=True).detach()

    def features(self, rows: Tensor) -> Tensor:
        """What D sees of a probability row: the row itself (``prob``) or its centred log
        (``logprob``: ``log max(p, 2^-24) - mean``, i.e. the logits up to softmax's free shift)."""
        if self.input == "prob":
            return rows
        logp = torch.log(rows.clamp_min(PROB_FLOOR))
        return logp - logp.mean(dim=1, keepdim=True)

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
            student_probs = self.student_rows(student_logits)
            if self.mode == "adversarial":
                student_probs = grad_reverse(student_probs, self.grl_lambda)
            rows = torch.cat([student_probs, teacher_probs.detach().float()], dim=0)
            out = self.discriminator(self.features(rows))
            target = self.targets(batch, device)
            bce = F.binary_cross_entropy_with_logits(out.float(), target)
        with torch.no_grad():
            acc = (out.argmax(dim=1) == target.argmax(dim=1)).float().mean()
        return DiscriminatorTerms(d_loss=bce.detach(), d_term=self.weight * bce, d_acc=acc)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, weight={self.weight}, grl_lambda={self.grl_lambda}, topk={self.topk}, "
                f"input={self.input!r}, match_store={self.match_store}")


def make_discriminator_optimizer(
    disc: Union[nn.Module, Iterable[nn.Parameter], None],
    lr: Optional[float] = None,
    kind: Optional[str] = None,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.5, 0.999),
) -> Optional[torch.optim.Optimizer]:
    """A separate optimiser for the discriminator (``--d-optimizer``, ``--d-lr``).

    ``lr`` defaults to ``float(DEFAULT_D_LR)`` (1e-3) and ``kind`` to ``DEFAULT_D_OPTIMIZER``;
    the caller resolves ``--d-lr student`` to the student's lr (and re-sets it every epoch).
    It is deliberately its own ``Optimizer`` object rather than a param group of the student's
    optimiser: LR schedulers only ever see the student's optimiser, so a numeric lr stays fixed.

    ``kind="adam"`` (default): Adam(lr, betas=(0.5, 0.999)), no weight decay -- a step size that
    does not depend on the scale of D's inputs, and beta1=0.5, the usual choice for a
    discriminator chasing a moving target.  ``kind="sgd"``: SGD(lr, momentum), no weight decay,
    the official optimiser type (pass the student's momentum).

    Accepts a :class:`Discriminator`, a :class:`DiscriminatorLoss` or an iterable of
    parameters; returns None when there is nothing to optimise (mode ``off``).
    """
    if disc is None:
        return None
    params = list(disc.parameters() if isinstance(disc, nn.Module) else disc)
    if not params:
        return None
    lr = float(DEFAULT_D_LR) if lr is None else float(lr)
    kind = DEFAULT_D_OPTIMIZER if kind is None else kind
    if not lr > 0:
        raise ValueError(f"discriminator lr must be > 0, got {lr}")
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    raise ValueError(f"unknown discriminator optimizer kind {kind!r} ({'|'.join(D_OPTIMIZERS)})")
