"""A distill run's configuration: the flags, their checks, and what ``--resume`` may change.

A run is defined by its training flags (student, init, store, schedule, optimiser, discriminator,
seed, ...). ``--resume`` continues the recorded run exactly: flags left out take their recorded
values, and a training flag given with another value is refused (it would silently change the
run: e.g. ``--epochs 200`` after a 180-epoch cosine run sends the lr back up). Paths (``--labels``,
``--data``) may move; the store is identified by its id and the dataset by its fingerprint.
Operational flags (``--val``, ``--device``, ``--precision``, ``--allow-decoder-mismatch``,
``--num-threads``) may change freely.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.discriminator import DEFAULT_D_LR, DEFAULT_D_OPTIMIZER
from storage.errors import UserError

D_LR_STUDENT = "student"

#: config field -> its command-line flag, for every flag that defines the run
TRAINING_FLAGS: dict[str, str] = {
    "student": "--student",
    "init": "--init",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "schedule": "--schedule",
    "image_size": "--image-size",
    "crops_per_step": "--crops-per-image-step",
    "discriminator": "--discriminator",
    "d_optimizer": "--d-optimizer",
    "d_lr": "--d-lr",
    "hard_label_weight": "--hard-label-weight",
    "seed": "--seed",
}


@dataclass
class DistillConfig:
    labels: str
    data: str
    student: str
    out: str
    init: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cos"
    image_size: int | None = None
    crops_per_step: int = 1
    discriminator: str = "meal-v2"
    d_optimizer: str = DEFAULT_D_OPTIMIZER
    d_lr: str | float = DEFAULT_D_LR
    hard_label_weight: float = 0.0
    val: str | None = None
    device: str = "auto"
    precision: str = "auto"
    allow_decoder_mismatch: bool = False
    seed: int = 0
    num_threads: int = 2
    resume: bool = False

    def validate(self) -> None:
        if self.init is None:
            raise UserError(
                "--init is required: MEAL V2 needs a good student initialisation; pass a checkpoint FILE, "
                "'pretrained' (torchvision weights from the local hub cache) or 'scratch'"
            )
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--crops-per-image-step", self.crops_per_step)):
            if value < 1:
                raise UserError(f"{flag} {value}: must be >= 1")
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr}: learning rates must be > 0")
        parse_d_lr(self.d_lr)
        if self.d_optimizer not in ("adam", "sgd"):
            raise UserError(f"--d-optimizer {self.d_optimizer}: use 'adam' or 'sgd'")
        if self.weight_decay < 0 or self.hard_label_weight < 0:
            raise UserError("--weight-decay/--hard-label-weight: must be >= 0")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"--image-size {self.image_size}: must be >= 1")
        parse_schedule(self.schedule, self.epochs)

    def d_lr_value(self) -> float | None:
        """D's fixed learning rate, or None when it follows the student's lr (``--d-lr student``)."""
        return parse_d_lr(self.d_lr)


def parse_d_lr(value: str | float) -> float | None:
    """``--d-lr``: a positive float, or 'student' (-> None: D's lr follows the student's schedule)."""
    if isinstance(value, str) and value.strip().lower() == D_LR_STUDENT:
        return None
    try:
        lr = float(value)
    except (TypeError, ValueError):
        lr = float("nan")
    if not lr > 0:
        raise UserError(f"--d-lr {value}: use a learning rate > 0 (e.g. 1e-4) or 'student'")
    return lr


def parse_schedule(text: str, epochs: int):
    """'cos' or 'step:M1,M2[,...]' (epochs at which lr is multiplied by 0.1) -> scheduler factory."""
    if text == "cos":
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if text.startswith("step:"):
        try:
            milestones = [int(m) for m in text[5:].split(",") if m]
        except ValueError:
            milestones = []
        if milestones and all(m > 0 for m in milestones):
            return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    raise UserError(f"--schedule {text}: use 'cos' or 'step:M1,M2' (epochs where the lr drops 10x)")


def _canonical(name: str, value: Any) -> Any:
    """A flag's value in a form where equal settings compare equal (1e-4 == '0.0001')."""
    if value is None:
        return None
    if name == "d_lr":
        try:
            lr = parse_d_lr(value)
        except UserError:
            return str(value)
        return D_LR_STUDENT if lr is None else lr
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def given_fields(cfg: DistillConfig) -> set[str]:
    """The fields of ``cfg`` that differ from the dataclass defaults (what a Python caller set)."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig) if f.default is not dataclasses.MISSING}
    return {name for name in TRAINING_FLAGS if _canonical(name, getattr(cfg, name)) != _canonical(name, defaults.get(name))}


def resumed_config(cfg: DistillConfig, recorded: dict, explicit: set[str] | None, checkpoint: Path) -> DistillConfig:
    """``cfg`` with every training flag set to the recorded run's value.

    ``explicit``: the flags the user gave (None: those that differ from the defaults). A given
    flag whose value differs from the recorded one is a UserError naming it and the way to start
    a new run from the checkpoint instead.
    """
    given = given_fields(cfg) if explicit is None else set(explicit) & set(TRAINING_FLAGS)
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    merged: dict[str, Any] = {}
    for name, flag in TRAINING_FLAGS.items():
        was = recorded.get(name, defaults[name])
        now = getattr(cfg, name)
        if name in given and _canonical(name, now) != _canonical(name, was):
            raise UserError(
                f"{flag} {now}: --resume continues the run in {checkpoint.parent} exactly as recorded ({flag} {was}); "
                f"to train on with other settings, start a new run from its weights: --init {checkpoint} --out NEW_DIR"
            )
        merged[name] = was
    return dataclasses.replace(cfg, **merged)


def as_record(cfg: DistillConfig) -> dict:
    """JSON-able dict of the config (what checkpoints and RUN/config.json hold)."""
    return dataclasses.asdict(cfg)


__all__ = [
    "D_LR_STUDENT", "TRAINING_FLAGS", "DistillConfig", "as_record", "given_fields", "parse_d_lr",
    "parse_schedule", "resumed_config",
]
