"""A distill run's configuration: the flags, their checks, and what ``--resume`` may change.

A run is defined by its training flags (student, init, store, schedule, optimiser, discriminator,
seed, ...). ``--resume`` continues the recorded run exactly: flags left out take their recorded
values, and a training flag given with another value is refused (it would silently change the
run: e.g. ``--epochs 200`` after a 180-epoch cosine run sends the lr back up). Paths (``--labels``,
``--data``) may move; the store is identified by its id and the dataset by its fingerprint.
Operational flags (``--val``, ``--device``, ``--precision``, ``--deterministic``, ``--allow-decoder-mismatch``,
``--num-threads``, ``--compile``, ``--compile-backend``, ``--channels-last``, ``--log-every``, ``--tensorboard``,
``--eval-every``, ``--keep-every``, ``--checkpoint-minutes``, the validation protocol) may change freely.
"""
from __future__ import annotations

import math
import os

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mealkd.core.models.spec import INIT_MODES
from mealkd.core.windows import check_image_size
from mealkd.distill.discriminator import DEFAULT_D_LR, DEFAULT_D_OPTIMIZER
from mealkd.distill.optimization import OPTIMIZERS, parse_milestones
from mealkd.errors import UserError

D_LR_STUDENT = "student"

#: config field -> its command-line flag, for every flag that defines the run
TRAINING_FLAGS: dict[str, str] = {
    "student": "--student",
    "init": "--init",
    "init_weights": "--init-weights",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "norm_bias_weight_decay": "--norm-bias-weight-decay",
    "min_lr": "--min-lr",
    "schedule": "--schedule",
    "image_size": "--image-size",
    "crops_per_step": "--crops-per-image-step",
    "discriminator": "--discriminator",
    "d_optimizer": "--d-optimizer",
    "d_lr": "--d-lr",
    "hard_label_weight": "--hard-label-weight",
    "seed": "--seed",
    "opt": "--opt",
    "warmup_epochs": "--warmup-epochs",
    "clip_grad": "--clip-grad",
    "ema_decay": "--ema-decay",
    "cutmix": "--cutmix",
    "mixup": "--mixup",
    "cutmix_alpha": "--cutmix-alpha",
    "mixup_alpha": "--mixup-alpha",
    "grad_accum_steps": "--grad-accum-steps",
    "sync_bn": "--sync-bn",
}


@dataclass
class DistillConfig:
    labels: str
    data: str
    student: str
    out: str
    init: str | None = None
    init_weights: str = "auto"  # --init FILE with EMA weights: auto (= EMA when there) | raw | ema
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    norm_bias_weight_decay: float | None = 0.0  # 1-D parameters (norm weights, biases); None: as --weight-decay
    schedule: str = "cos"
    min_lr: float = 0.0  # the cosine's end
    image_size: int | None = None
    crops_per_step: int = 1
    discriminator: str = "meal-v2"
    d_optimizer: str = DEFAULT_D_OPTIMIZER
    d_lr: str | float = DEFAULT_D_LR
    hard_label_weight: float = 0.0
    val: str | None = None
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = False
    allow_decoder_mismatch: bool = False
    seed: int = 0
    num_threads: int | None = None  # DALI CPU threads; None: auto (core.dali_io.auto_threads)
    resume: bool = False
    opt: str = "sgd"
    warmup_epochs: float = 0.0
    clip_grad: float | None = None
    sync_bn: bool = False  # BatchNorm statistics over every GPU of the job (torch.nn.SyncBatchNorm)
    ema_decay: float | None = None
    cutmix: float = 0.0
    mixup: float = 0.0
    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.8
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: str = "auto"
    log_every: int = 50
    tensorboard: bool = False
    eval_every: int = 1
    keep_every: int = 0
    checkpoint_minutes: float = 30.0
    resize_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    grad_accum_steps: int = 1  # batches whose gradients make one optimiser step (global batch x this)

    def validate(self) -> None:
        if self.init is None:
            raise UserError(
                "--init is required: MEAL V2 needs a good student initialisation; pass a checkpoint FILE, "
                "'pretrained' (torchvision weights from the local hub cache) or 'scratch'"
            )
        if self.init_weights not in ("auto", "raw", "ema"):
            raise UserError(f"--init-weights {self.init_weights}: choose auto, raw or ema")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--crops-per-image-step", self.crops_per_step),
                            ("--grad-accum-steps", self.grad_accum_steps)):
            if value < 1:
                raise UserError(f"{flag} {value}: must be >= 1")
        if self.checkpoint_minutes < 0:
            raise UserError(f"--checkpoint-minutes {self.checkpoint_minutes}: must be >= 0 (0: only at the end of each epoch)")
        if not (self.lr > 0 and math.isfinite(self.lr)):  # NaN fails '> 0' (it was blamed on --min-lr); inf trains to NaN
            raise UserError(f"--lr {self.lr}: learning rates must be finite numbers > 0")
        parse_d_lr(self.d_lr)
        if self.d_optimizer not in ("adam", "sgd"):
            raise UserError(f"--d-optimizer {self.d_optimizer}: use 'adam' or 'sgd'")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum {self.momentum}: must lie in [0, 1), e.g. 0.9")
        if self.weight_decay < 0 or self.hard_label_weight < 0:
            raise UserError("--weight-decay/--hard-label-weight: must be >= 0")
        if self.norm_bias_weight_decay is not None and self.norm_bias_weight_decay < 0:
            raise UserError(f"--norm-bias-weight-decay {self.norm_bias_weight_decay}: must be >= 0")
        if not 0 <= self.min_lr < self.lr:
            raise UserError(f"--min-lr {self.min_lr}: must be >= 0 and below --lr {self.lr}")
        if self.min_lr > 0 and self.schedule != "cos":
            raise UserError(f"--min-lr {self.min_lr}: it is where --schedule cos ends; --schedule {self.schedule} drops 10x at its milestones")
        if self.image_size is not None:
            check_image_size(self.image_size)
        milestones = parse_milestones(self.schedule)
        if milestones is not None and (milestones != sorted(set(milestones)) or milestones[-1] >= self.epochs):
            raise UserError(f"--schedule {self.schedule}: milestones must increase and lie below --epochs {self.epochs} "
                            "(the epochs at whose start the lr drops 10x; a later one never acts)")
        if self.opt not in OPTIMIZERS:
            raise UserError(f"--opt {self.opt}: choose one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs}: must be >= 0 and less than --epochs {self.epochs}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserError(f"--clip-grad {self.clip_grad}: the maximum gradient norm must be > 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError(f"--ema-decay {self.ema_decay}: must lie in (0, 1), e.g. 0.9998")
        for flag, p in (("--cutmix", self.cutmix), ("--mixup", self.mixup)):
            if not 0 <= p <= 1:
                raise UserError(f"{flag} {p}: a probability in [0, 1]")
        if self.cutmix + self.mixup > 1:
            raise UserError(f"--cutmix {self.cutmix} + --mixup {self.mixup}: the two probabilities add up to more than 1")
        for flag, a in (("--cutmix-alpha", self.cutmix_alpha), ("--mixup-alpha", self.mixup_alpha)):
            if not a > 0:
                raise UserError(f"{flag} {a}: the Beta distribution's alpha must be > 0")
        if self.channels_last not in ("auto", "on", "off"):
            raise UserError(f"--channels-last {self.channels_last}: choose auto, on or off")
        for flag, n in (("--log-every", self.log_every), ("--eval-every", self.eval_every)):
            if n < 1:
                raise UserError(f"{flag} {n}: must be >= 1")
        if self.keep_every < 0:
            raise UserError(f"--keep-every {self.keep_every}: must be >= 0 (0 keeps no epoch snapshots)")

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


#: what a run recorded before a training flag existed did, when that differs from the flag's default: such a
#: run resumes as it trained (its optimiser state has one parameter group; its --init took the raw weights)
LEGACY = {"norm_bias_weight_decay": None, "init_weights": "raw"}


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
    if name == "init" and value not in INIT_MODES:  # a file: the same one written relative or absolute
        return os.path.abspath(os.path.expanduser(str(value)))
    return value


def given_fields(cfg: DistillConfig) -> set[str]:
    """The fields of ``cfg`` that differ from the dataclass defaults (what a Python caller set)."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig) if f.default is not dataclasses.MISSING}
    return {name for name in TRAINING_FLAGS if _canonical(name, getattr(cfg, name)) != _canonical(name, defaults.get(name))}


#: the flags that split the global batch (--batch-size x processes x --grad-accum-steps) over a job's processes
BATCH_SPLIT = ("batch_size", "grad_accum_steps")


def split_global_batch(batch: int, accum: int, world: int, new_world: int, cap: int | None = None) -> tuple[int, int] | None:
    """(--batch-size, --grad-accum-steps) that give ``new_world`` processes the global batch ``batch x world x
    accum``: the fewest accumulation steps whose per-process batch is whole and no larger than ``cap`` (the
    largest the run has trained with: a process's memory holds it; default ``batch``); None if there is none."""
    images, cap = batch * world * accum, max(batch, cap or 0)
    for steps in range(1, images // new_world + 1):
        if images % (new_world * steps) == 0 and images // (new_world * steps) <= cap:
            return images // (new_world * steps), steps
    return None


def _regrouped(recorded: tuple[int, int], changed: dict[str, int], worlds: tuple[int, int], checkpoint: Path,
               cap: int | None) -> dict[str, int]:
    """--batch-size and --grad-accum-steps for this job's process count: those given with other values than the
    recorded ones (their product with the processes must be the run's global batch), else
    :func:`split_global_batch`'s. A flag repeated with its recorded value counts as not given: a requeued job
    script repeats the flags it started with."""
    (batch, accum), (was, now) = recorded, worlds
    images = batch * was * accum
    restart = f"or start a new run from its weights: --init {checkpoint} --out NEW_DIR"
    split = split_global_batch(batch, accum, was, now, cap)
    if not changed:
        if split is None:
            raise UserError(f"--out {checkpoint.parent}: the run's global batch of {images} (--batch-size {batch} x {was} process(es) x "
                            f"--grad-accum-steps {accum}) does not split over {now} process(es); resume it with a process count that "
                            f"divides {images}, {restart}")
        return {"batch_size": split[0], "grad_accum_steps": split[1]}
    b, a = changed.get("batch_size", batch), changed.get("grad_accum_steps", accum)
    if b * now * a != images:
        hint = f" (e.g. --batch-size {split[0]} --grad-accum-steps {split[1]})" if split else ""
        raise UserError(f"--batch-size {b} x {now} process(es) x --grad-accum-steps {a} = {b * now * a} images per optimiser step; the run in "
                        f"{checkpoint.parent} trained with {images} ({batch} x {was} x {accum}): keep that product{hint}, {restart}")
    return {"batch_size": b, "grad_accum_steps": a}


def resumed_config(cfg: DistillConfig, recorded: dict, explicit: set[str] | None, checkpoint: Path,
                   worlds: tuple[int, int] | None = None, batch_cap: int | None = None) -> DistillConfig:
    """``cfg`` with every training flag set to the recorded run's value.

    ``explicit``: the flags the user gave (None: those that differ from the defaults). A given
    flag whose value differs from the recorded one is a UserError naming it and the way to start
    a new run from the checkpoint instead. ``worlds``: (the run's process count, this job's) of a run
    with epochs left: when they differ, the global batch is kept by regrouping it (``_regrouped``), with per-process
    batches up to ``batch_cap`` (the largest the run has used).
    """
    given = given_fields(cfg) if explicit is None else set(explicit) & set(TRAINING_FLAGS)
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    regroup = worlds is not None and worlds[0] != worlds[1]
    merged: dict[str, Any] = {}
    changed: dict[str, Any] = {}
    for name, flag in TRAINING_FLAGS.items():
        was = recorded.get(name, LEGACY.get(name, defaults[name]))
        now = getattr(cfg, name)
        if name in given and _canonical(name, now) != _canonical(name, was):
            if not (regroup and name in BATCH_SPLIT):
                raise UserError(
                    f"{flag} {now}: --resume continues the run in {checkpoint.parent} exactly as recorded ({flag} {was}); "
                    f"to train on with other settings, start a new run from its weights: --init {checkpoint} --out NEW_DIR"
                )
            changed[name] = int(now)
        merged[name] = was
    if regroup:
        merged.update(_regrouped((int(merged["batch_size"]), int(merged["grad_accum_steps"])), changed, worlds, checkpoint, batch_cap))
    return dataclasses.replace(cfg, **merged)


def as_record(cfg: DistillConfig) -> dict:
    """JSON-able dict of the config (what checkpoints and RUN/config.json hold)."""
    return dataclasses.asdict(cfg)


__all__ = [
    "BATCH_SPLIT", "D_LR_STUDENT", "TRAINING_FLAGS", "DistillConfig", "as_record", "given_fields", "parse_d_lr", "resumed_config",
    "split_global_batch",
]
