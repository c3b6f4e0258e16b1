"""The student's optimiser and learning-rate schedule, stepped once per training step.

Schedules (``--schedule``), after ``--warmup-epochs`` of linear warm-up from lr/100 to lr:

* ``cos``: cosine from lr to ``--min-lr`` (default 0) over the remaining steps, updated every step (not every epoch);
* ``step:M1,M2,...``: lr x 0.1 at the start of each milestone epoch (MEAL V2's ImageNet recipe
  is 180 epochs with step decays).

``--lr`` is the learning rate of the GLOBAL batch (``--batch-size`` x number of processes x ``--grad-accum-steps``). When
changing the global batch, scale it linearly (Goyal et al., 2017): e.g. SGD lr 0.1 per 256
images, so batch 64 on 8 GPUs (512) -> 0.2. MEAL V2 used 0.01 for a pretrained ResNet-50 student.
"""
from __future__ import annotations

import math

import torch

from mealkd.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
WARMUP_START = 0.01  # warm-up starts at lr x this


def parse_milestones(text: str) -> list[int] | None:
    """'cos' -> None; 'step:M1,M2' -> [M1, M2] (epochs); anything else is a UserError."""
    if text == "cos":
        return None
    if text.startswith("step:"):
        try:
            milestones = [int(m) for m in text[5:].split(",") if m]
        except ValueError:
            milestones = []
        if milestones and all(m > 0 for m in milestones):
            return milestones
    raise UserError(f"--schedule {text}: use 'cos' or 'step:M1,M2' (epochs where the lr drops 10x)")


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: float, milestones: list[int] | None,
              floor: float = 0.0) -> float:
    """The multiplier of ``--lr`` at global training step ``step`` (0-based); ``floor``: the cosine's end
    (``--min-lr`` / ``--lr``)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total, round(warmup_epochs * steps_per_epoch))
    if step < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    if milestones is None:
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    epoch = step // steps_per_epoch
    return 0.1 ** sum(epoch >= m for m in milestones)


def make_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int, warmup_epochs: float,
                   schedule: str, min_lr_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR for the schedule (call ``.step()`` after every optimiser step)."""
    milestones = parse_milestones(schedule)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=warmup_epochs,
                                          milestones=milestones, floor=min_lr_factor)
    )


def restart_schedule_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a restored per-step schedule at optimiser step ``step`` of its own plan, with each group's lr at that
    step's value (a run resumed by another process count may have another number of steps per epoch)."""
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)


def param_groups(model: torch.nn.Module, weight_decay: float, norm_bias_weight_decay: float | None) -> list[dict]:
    """The student's parameters for the optimiser: ``weight_decay`` on weight matrices and kernels, and
    ``norm_bias_weight_decay`` on 1-D parameters (normalisation weights and every bias), as timm does by
    default: decaying LayerNorm/BatchNorm scales and biases costs accuracy (ViTs with AdamW). One group
    when the two agree (``None``: the same; how runs recorded before this option train)."""
    params = list(model.parameters())
    if norm_bias_weight_decay is None or norm_bias_weight_decay == weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": norm_bias_weight_decay}]


def make_optimizer(kind: str, groups: list[dict], *, lr: float, momentum: float, on_cuda: bool) -> torch.optim.Optimizer:
    """SGD with momentum (MEAL V2) or AdamW (ViT/timm students) over ``groups`` (:func:`param_groups`);
    fused kernels on CUDA."""
    fused = {"fused": True} if on_cuda else {}  # one kernel for the whole update instead of one per tensor
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **fused)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    raise UserError(f"--opt {kind}: choose one of {', '.join(OPTIMIZERS)}")
