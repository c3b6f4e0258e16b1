"""Stage-two losses: soft cross-entropy to stored ensemble vectors (MEAL V2 style).

The stored labels are ensemble-averaged softmax vectors ``p`` (rows of a (B, C) tensor).
The student is trained with

    soft_ce(z, p) = mean_b [ -sum_c p[b, c] * log_softmax(z)[b, c] ]

which is the loss MEAL V2 reports as ``G_Loss`` (its ``CrossEntropy``).  The KL divergence
``KL(p || softmax(z)) = soft_ce - H(p)`` has exactly the same gradient with respect to the
logits (H(p) does not depend on z); it is offered as :func:`kl_to_targets` because it is 0 at
a perfect fit and so is easier to read across datasets, but **the value reported as "loss"
is the soft cross-entropy** (comparable to the official logs).

All reductions are done in float32: logits that come out of autocast as float16/bfloat16
(and fp16 stored targets) are upcast before ``log_softmax``; the returned scalars are float32.

Targets are used as given (no renormalisation).  If a caller's decoded vectors do not sum to
exactly 1 (e.g. top-k storage), the gradient is ``sum(p) * softmax(z) - p``; normalise in the
label decoder if that matters.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "soft_cross_entropy",
    "kl_to_targets",
    "target_entropy",
    "teacher_agreement",
    "DistillLoss",
    "DistillLossParts",
]


def _check_pair(logits: Tensor, target_probs: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    if target_probs.shape != logits.shape:
        raise ValueError(
            f"target_probs shape {tuple(target_probs.shape)} != logits shape {tuple(logits.shape)}"
        )


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c p * log_softmax(logits)``, computed in float32.

    ``target_probs`` is treated as a constant (it is detached); the gradient with respect to
    ``logits`` is ``(softmax(logits) - p) / batch`` for rows of ``p`` that sum to 1.
    Returns a float32 scalar whatever the dtype of ``logits``.
    """
    _check_pair(logits, target_probs)
    logp = F.log_softmax(logits.float(), dim=1)
    p = target_probs.detach().float()
    return -(p * logp).sum(dim=1).mean()


def target_entropy(target_probs: Tensor) -> Tensor:
    """Mean over the batch of the entropy ``H(p) = -sum p log p`` (with 0 log 0 = 0), float32."""
    p = target_probs.detach().float()
    return -torch.special.xlogy(p, p).sum(dim=1).mean()


def kl_to_targets(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of ``KL(p || softmax(logits))`` = soft CE - H(p), float32.

    Same gradient as :func:`soft_cross_entropy`; 0 when the student reproduces ``p``.
    """
    _check_pair(logits, target_probs)
    logp = F.log_softmax(logits.float(), dim=1)
    p = target_probs.detach().float()
    return (torch.special.xlogy(p, p) - p * logp).sum(dim=1).mean()


@torch.no_grad()
def teacher_agreement(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Fraction (float32 scalar in [0, 1]) of rows whose argmax equals the target's argmax.

    Ties resolve to the lowest index on both sides (``torch.argmax``).
    """
    _check_pair(logits, target_probs)
    if logits.shape[0] == 0:
        return torch.zeros((), dtype=torch.float32, device=logits.device)
    same = logits.argmax(dim=1) == target_probs.argmax(dim=1)
    return same.float().mean()


class DistillLossParts(NamedTuple):
    """Components of :class:`DistillLoss` (all float32 scalars).

    ``total`` is what to backpropagate; ``soft`` is the (T²-scaled) soft cross-entropy (the
    reported "loss"); ``hard`` is the one-hot cross-entropy, or None when ``hard_label_weight == 0``.
    """

    total: Tensor
    soft: Tensor
    hard: Optional[Tensor]


class DistillLoss(nn.Module):
    """``T² · soft_cross_entropy(logits / T, p) + hard_label_weight · cross_entropy(logits, y)``.

    ``temperature`` T is the one the stored rows were made at (``p = softmax(z_teacher / T)``,
    the store's ``temperature`` attribute). The student is fitted at the same T, as Hinton et al.
    do, so it learns the teachers' logits (up to a constant) rather than ``z_teacher / T``; the
    ``T²`` keeps the soft term's gradient magnitude independent of T. At T = 1 this is exactly
    the soft cross-entropy. The hard term always uses T = 1.

    ``hard_label_weight`` defaults to 0: no one-hot term, as MEAL V2 (the student never sees
    ground-truth labels). The hard term is additive (not a convex mix), so weight 0 gives
    exactly the soft loss. ``hard_targets`` (int64 class indices (B,), or float class
    distributions (B, C) for mixed batches) are required only when the weight is > 0; they are
    ignored otherwise.
    """

    def __init__(self, hard_label_weight: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        hard_label_weight = float(hard_label_weight)
        if hard_label_weight < 0 or hard_label_weight != hard_label_weight:
            raise ValueError(f"hard_label_weight must be >= 0, got {hard_label_weight}")
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.hard_label_weight = hard_label_weight
        self.temperature = temperature

    def parts(
        self, logits: Tensor, target_probs: Tensor, hard_targets: Optional[Tensor] = None
    ) -> DistillLossParts:
        t = self.temperature
        soft = soft_cross_entropy(logits.float() / t, target_probs) * (t * t)  # exact soft CE at T = 1
        if self.hard_label_weight == 0.0:
            return DistillLossParts(total=soft, soft=soft, hard=None)
        if hard_targets is None:
            raise ValueError("hard_targets are required when hard_label_weight > 0")
        if hard_targets.is_floating_point():  # class distributions (CutMix/Mixup of one-hot classes)
            if hard_targets.shape != logits.shape:
                raise ValueError(f"hard_targets shape {tuple(hard_targets.shape)} != logits shape {tuple(logits.shape)}")
            hard = F.cross_entropy(logits.float(), hard_targets.float())
        else:
            if hard_targets.shape != logits.shape[:1]:
                raise ValueError(f"hard_targets shape {tuple(hard_targets.shape)} != ({logits.shape[0]},)")
            hard = F.cross_entropy(logits.float(), hard_targets.long())
        return DistillLossParts(total=soft + self.hard_label_weight * hard, soft=soft, hard=hard)

    def forward(
        self, logits: Tensor, target_probs: Tensor, hard_targets: Optional[Tensor] = None
    ) -> Tensor:
        return self.parts(logits, target_probs, hard_targets).total

    def extra_repr(self) -> str:
        return f"hard_label_weight={self.hard_label_weight}, temperature={self.temperature}"
