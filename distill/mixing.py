"""CutMix / Mixup with stored labels: the offline equivalent of MEAL V2's CutMix option.

Each sample is paired with the sample at the mirrored position of the batch (b <-> B-1-b, as timm
does), and the pixels of the two stored crops are mixed with a weight lambda ~ Beta(alpha, alpha):

* Mixup: ``x = lam * x + (1 - lam) * x_pair``;
* CutMix: a box of area ``(1 - lam) * S^2`` centred at a uniform point (clipped to the image) is
  pasted from the pair, and lambda is corrected to the kept area: ``1 - box_area / S^2``.

The stored label rows are mixed with the same (corrected) lambda, and so is the one-hot of each
crop's class (for ``--hard-label-weight``). One draw per batch decides: CutMix with probability
``cutmix``, else Mixup with probability ``mixup``, else nothing. All draws come from torch's
generator, reseeded per rank and epoch by the trainer, so a resumed epoch mixes identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mealkd.distill.loader import Batch


@dataclass(frozen=True)
class MixPolicy:
    cutmix: float = 0.0  # probability of CutMix per batch
    mixup: float = 0.0  # probability of Mixup per batch (when CutMix was not drawn)
    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.8

    @property
    def active(self) -> bool:
        return self.cutmix > 0 or self.mixup > 0


def cutmix_box(size: int, lam: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box with area about (1 - lam) of size x size at a uniform centre, clipped."""
    side = size * (1.0 - lam) ** 0.5
    cy, cx = (int(v) for v in torch.randint(0, size, (2,)))
    half = int(side / 2)
    return max(cy - half, 0), min(cy + half, size), max(cx - half, 0), min(cx + half, size)


def mix(batch: Batch, policy: MixPolicy, num_classes: int) -> tuple[Batch, str, float]:
    """The batch with pixels, label rows and classes mixed -> (batch, 'cutmix'|'mixup'|'none', lambda).

    Mixed batches carry ``classes`` as float (B, C) class distributions instead of int64 indices."""
    if not policy.active or batch.images.shape[0] < 2:
        return batch, "none", 1.0
    draw = float(torch.rand(()))
    if draw < policy.cutmix:
        kind, alpha = "cutmix", policy.cutmix_alpha
    elif draw < policy.cutmix + policy.mixup:
        kind, alpha = "mixup", policy.mixup_alpha
    else:
        return batch, "none", 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    images = batch.images
    pair = images.flip(0)
    if kind == "mixup":
        mixed = images * lam + pair * (1.0 - lam)
    else:
        size = images.shape[-1]
        y0, y1, x0, x1 = cutmix_box(size, lam)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = pair[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (size * images.shape[-2])
    labels = batch.labels * lam + batch.labels.flip(0) * (1.0 - lam)
    onehot = torch.nn.functional.one_hot(batch.classes.long(), num_classes).float()
    classes = onehot * lam + onehot.flip(0) * (1.0 - lam)
    return Batch(mixed, labels, classes), kind, lam
