"""Stage two: train a student against the stored ensemble vectors (MEAL V2 recipe).

Per step: student logits -> soft cross-entropy to the stored vector (+ optional hard-label term)
+ the discriminator term; one backward; SGD (momentum 0.9, weight decay 0 by default) for the
student, its own optimiser and learning rate for the discriminator. A checkpoint is written
atomically after every epoch with everything needed to continue bit-identically on CPU.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from rich.console import Console
from rich.progress import TextColumn

import storage
from core.accel import as_model_input, autocast_for
from core.dali_io import resolve_backend
from core.dataset import scan_image_folder
from core.distributed import Dist, init_distributed, shutdown
from core.models import load_model, parse_spec
from core.progress import RateColumn, make_progress
from core.replay import Normalization
from distill.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from distill.discriminator import DiscriminatorLoss, make_discriminator_optimizer
from distill.evaluate import evaluate, readable_images
from distill.loader import ReplayLoader
from distill.losses import DistillLoss, teacher_agreement
from storage.errors import UserError
from storage.testhooks import kill_point

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


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
    d_lr: float = 1e-4
    hard_label_weight: float = 0.0
    val: str | None = None
    device: str = "auto"
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
        if self.lr <= 0 or self.d_lr <= 0:
            raise UserError("--lr/--d-lr: learning rates must be > 0")
        if self.weight_decay < 0 or self.hard_label_weight < 0:
            raise UserError("--weight-decay/--hard-label-weight: must be >= 0")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"--image-size {self.image_size}: must be >= 1")
        parse_schedule(self.schedule, self.epochs)


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


class Trainer:
    def __init__(self, cfg: DistillConfig, console: Console | None = None):
        cfg.validate()
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.backend = resolve_backend(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        self.dist: Dist = init_distributed(self.backend.is_cuda)
        self.device = self.backend.device
        self.run_dir = Path(cfg.out)
        torch.manual_seed(cfg.seed)

        self.index = scan_image_folder(cfg.data)
        self.store = storage.open_store(cfg.labels, fingerprint=self.index.fingerprint, class_names=self.index.class_names)
        self.class_names = self.store.class_names
        spec = parse_spec(cfg.student)
        self.student = load_model(spec, num_classes=self.store.num_classes, init=cfg.init)
        size = cfg.image_size or int(self.store.attrs["crop"]["image_size"])
        self.norm = Normalization(size=size, mean=tuple(self.student.mean), std=tuple(self.student.std))

        model = self.student.module.to(self.device)
        if self.backend.is_cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp_model = torch.nn.parallel.DistributedDataParallel(model) if self.dist.active else model
        self.loss = DistillLoss(cfg.hard_label_weight)
        self.disc = DiscriminatorLoss(self.store.num_classes, mode=cfg.discriminator).to(self.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = parse_schedule(cfg.schedule, cfg.epochs)(self.optimizer)
        self.d_optimizer = make_discriminator_optimizer(self.disc, lr=cfg.d_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.backend.is_cuda)  # a no-op on CPU
        self.loader = ReplayLoader(
            self.store,
            self.index,
            self.norm,
            self.backend,
            batch_size=cfg.batch_size,
            crops_per_step=cfg.crops_per_step,
            seed=cfg.seed,
            dist=self.dist,
            num_threads=cfg.num_threads,
        )
        self.val_index = scan_image_folder(cfg.val, flag="--val") if cfg.val else None
        self.val_ids = readable_images(self.val_index, self.backend, flag="--val", console=self.console) if self.val_index and self.dist.is_main else None
        self.start_epoch = self._restore()

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def _restore(self) -> int:
        if not self.checkpoint_path.exists():
            return 0
        if not self.cfg.resume:
            raise UserError(f"--out {self.run_dir}: holds a checkpoint already; pass --resume to continue it or choose another --out")
        ckpt = load_checkpoint(self.checkpoint_path, flag="--out")
        if ckpt["student_spec"] != self.cfg.student or ckpt["store_fingerprint"] != self.store.attrs["dataset"]["fingerprint"]:
            raise UserError(f"--out {self.run_dir}: its checkpoint is for another student or store; choose another --out")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.disc.enabled:
            self.disc.load_state_dict(ckpt["discriminator"])
            self.d_optimizer.load_state_dict(ckpt["d_optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.backend.is_cuda and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], self.device)
        return int(ckpt["epoch"])

    def _checkpoint(self, epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "student_spec": self.cfg.student,
            "num_classes": self.store.num_classes,
            "class_names": self.class_names,
            "norm": asdict(self.norm),
            "discriminator": self.disc.state_dict() if self.disc.enabled else None,
            "optimizer": self.optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(self.device)] if self.backend.is_cuda else None},
            "config": asdict(self.cfg),
            "store_fingerprint": self.store.attrs["dataset"]["fingerprint"],
        }

    # -- metrics ------------------------------------------------------------------------------
    def _trim_metrics(self) -> None:
        """Drop metric lines of epochs after the checkpoint (from a run killed after logging them)."""
        path = self.run_dir / METRICS_NAME
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= self.start_epoch]
        path.write_text("".join(line + "\n" for line in lines))

    def _log(self, record: dict) -> None:
        with open(self.run_dir / METRICS_NAME, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- training -----------------------------------------------------------------------------
    def _reduce_discriminator_grads(self) -> None:
        if not (self.dist.active and self.disc.enabled):
            return
        for param in self.disc.parameters():
            if param.grad is not None:
                torch_dist.all_reduce(param.grad)
                param.grad /= self.dist.world_size

    def train_epoch(self, epoch: int, progress, task) -> dict:
        self.ddp_model.train()
        scaler = self.scaler
        totals = {"loss": 0.0, "d_loss": 0.0, "agreement": 0.0, "steps": 0, "crops": 0}
        started = time.perf_counter()
        for images, targets in self.loader.epoch(epoch):
            images = as_model_input(images)
            with autocast_for(self.device):
                logits = self.ddp_model(images)
            parts = self.loss.parts(logits, targets)
            terms = self.disc(logits, targets)
            total = parts.total + terms.d_term
            self.optimizer.zero_grad(set_to_none=True)
            if self.d_optimizer is not None:
                self.d_optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            self._reduce_discriminator_grads()
            scaler.step(self.optimizer)
            if self.d_optimizer is not None:
                scaler.step(self.d_optimizer)
            scaler.update()
            kill_point("distill-step")
            totals["loss"] += float(parts.soft.detach())
            totals["d_loss"] += float(terms.d_loss)
            totals["agreement"] += float(teacher_agreement(logits.detach(), targets))
            totals["steps"] += 1
            totals["crops"] += images.shape[0]
            steps = totals["steps"]
            progress.update(
                task,
                advance=1,
                loss=totals["loss"] / steps,
                d_loss=totals["d_loss"] / steps,
                agree=totals["agreement"] / steps,
                crops_per_step=images.shape[0] * self.dist.world_size,
            )
        elapsed = time.perf_counter() - started
        if self.dist.active:  # log the epoch's global means, not rank 0's shard (every rank runs the same steps)
            summed = torch.tensor([totals[k] for k in ("loss", "d_loss", "agreement")], dtype=torch.float64)
            torch_dist.all_reduce(summed)
            for key, value in zip(("loss", "d_loss", "agreement"), (summed / self.dist.world_size).tolist()):
                totals[key] = value
        steps = max(1, totals["steps"])
        return {
            "epoch": epoch + 1,
            "loss": totals["loss"] / steps,
            "d_loss": totals["d_loss"] / steps,
            "teacher_agreement": totals["agreement"] / steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "crops_per_s": totals["crops"] * self.dist.world_size / max(elapsed, 1e-9),
            "seconds": elapsed,
        }

    def run(self) -> list[dict]:
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
        records = []
        steps = self.loader.steps_per_epoch()
        columns = (
            RateColumn("crops", "crops_per_step"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("D {task.fields[d_loss]:.3f}"),
            TextColumn("agree {task.fields[agree]:.1%}"),
        )
        with make_progress(self.console, *columns, enabled=self.dist.is_main) as progress:
            for epoch in range(self.start_epoch, cfg.epochs):
                task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, loss=0.0, d_loss=0.0, agree=0.0, crops_per_step=cfg.batch_size)
                record = self.train_epoch(epoch, progress, task)
                self.scheduler.step()
                if self.val_index is not None and self.dist.is_main:
                    result = evaluate(self.model, self.val_index, self.class_names, self.norm, self.backend, batch_size=cfg.batch_size, num_threads=cfg.num_threads, ids=self.val_ids)
                    record.update(val_top1=result["top1"], val_top5=result["top5"])
                if self.dist.is_main:
                    try:
                        self._log(record)
                        kill_point("distill-checkpoint")
                        save_atomic(self._checkpoint(epoch + 1), self.checkpoint_path)
                    except OSError as err:
                        raise UserError(
                            f"--out {self.run_dir}: writing the epoch {epoch + 1} checkpoint failed ({err.strerror or err}); "
                            "free space or choose another --out, then rerun with --resume (the previous checkpoint is intact)"
                        ) from None
                    progress.console.print(_format_record(record))
                self.dist.barrier()
                records.append(record)
        self.loader.close()
        return records

    def close(self) -> None:
        shutdown(self.dist)


def _format_record(record: dict) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f}  D {record['d_loss']:.3f}  agree {record['teacher_agreement']:.1%}  {record['crops_per_s']:.0f} crops/s"
    if "val_top1" in record:
        text += f"  val top-1 {record['val_top1']:.2%} top-5 {record['val_top5']:.2%}"
    return text


def run_distill(cfg: DistillConfig, console: Console | None = None) -> list[dict]:
    trainer = Trainer(cfg, console)
    try:
        return trainer.run()
    finally:
        trainer.close()
