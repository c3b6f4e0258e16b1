"""Stage two: train a student against the stored ensemble vectors (MEAL V2 recipe).

Per step: optional CutMix/Mixup of the stored crops and their stored rows (distill.mixing) ->
student logits -> T²-scaled soft cross-entropy at the store's temperature T to the stored vector
(+ optional hard-label term on the image's class) + the discriminator term; one backward;
optional gradient clipping; with ``--grad-accum-steps N`` the gradients of N batches (each loss weighted
by its share of their crops) make one optimiser step; SGD (momentum 0.9, weight decay 0 by default) or AdamW for the
student with a per-step schedule (distill.optimization), its own optimiser for the discriminator
(fixed lr, or the student's lr with ``--d-lr student``); optional EMA of the student.

After every epoch (validation every ``--eval-every`` epochs, raw and EMA weights) a checkpoint is
written atomically with everything needed to continue bit-identically on CPU (torch's RNG is
reseeded from (seed, rank, epoch) at every epoch, so no RNG state needs saving), plus ``best.pt``
(best validation top-1) and ``epoch_NNNN.pt`` every ``--keep-every`` epochs. A stop signal
(SIGTERM, SIGUSR1, Ctrl-C: distill.preemption) ends the run after the current step with a
checkpoint of that point of the epoch, which then also holds each rank's RNG states and running
sums; ``--checkpoint-minutes`` writes such a checkpoint inside long epochs too. ``--resume``
continues exactly the recorded run (see distill.config), from an epoch's end or from the step its
checkpoint holds.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
from rich.console import Console
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mealkd import storage
from mealkd.console import make_console
from mealkd.core.accel import apply_numerics, autocast_for, compiled, needs_grad_scaler, resolve_precision
from mealkd.core.dali_io import dali_threads, decoder_differences, decoder_record, resolve_backend
from mealkd.core.dataset import scan_image_folder
from mealkd.core.distributed import Dist, env_rank, env_world_size, init_distributed, seed_for, shutdown
from mealkd.core.file_lock import FileLock
from mealkd.core.models import INIT_MODES, load_model, parse_spec
from mealkd.core.replay import Normalization, recorded_hw_load
from mealkd.core.timing import StageTimes, format_duration
from mealkd.distill.checkpoint import CHECKPOINT_FORMAT, copy_atomic, load_checkpoint, save_atomic
from mealkd.distill.config import DistillConfig, as_record, resumed_config
from mealkd.distill.discriminator import DiscriminatorLoss, DiscriminatorTerms, make_discriminator_optimizer
from mealkd.distill.checkpoint_eval import init_from_ema
from mealkd.distill.evaluate import EvalProtocol, class_mapping, evaluate_models, readable_images
from mealkd.distill.loader import Batch, ReplayLoader
from mealkd.distill.losses import DistillLoss, DistillLossParts, teacher_agreement
from mealkd.distill.mixing import MixPolicy, mix
from mealkd.distill.optimization import make_optimizer, make_scheduler, param_groups, restart_schedule_at
from mealkd.distill.preemption import GracefulStop
from mealkd.distill.run_log import CONFIG_NAME, METRICS_NAME, RunLog, d_text
from mealkd.errors import StopRequested, UserError
from mealkd.faults import kill_point

__all__ = ["BEST_NAME", "CHECKPOINT_NAME", "CONFIG_NAME", "METRICS_NAME", "DistillConfig", "Trainer", "run_distill"]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
RUN_LOCK_NAME = ".lock"  # held by the running distill (rank 0)
PROBE_IMAGES = 4  # images of the last batch the student's outputs are checked on before a save (Trainer._check_finite)
SUMS = ("loss", "hard_loss", "d_loss", "d_acc", "agreement")  # per-batch means, summed over an epoch weighted by the batch's crops


class Trainer:
    def __init__(self, cfg: DistillConfig, console: Console | None = None, *, explicit: set[str] | None = None):
        """``explicit``: the training flags the user gave on the command line (None: those that differ
        from the defaults); with ``--resume`` they must agree with the recorded run."""
        self.console = console or make_console()
        self.run_dir = Path(cfg.out).expanduser()
        worlds = None
        try:  # refusals of the flags and the checkpoint: every rank finds the same, rank 0 prints it
            self.resume_from = self._resume_checkpoint(cfg)
            if self.resume_from is not None:
                worlds = self._worlds()
                recorded = dict(self.resume_from.get("config") or {})
                if recorded.get("image_size") is None:  # the student's own size: the one it trained at, which a resume may state
                    recorded["image_size"] = (self.resume_from.get("norm") or {}).get("size")
                cfg = resumed_config(cfg, recorded, explicit, self.checkpoint_path, worlds=worlds,
                                     batch_cap=(self.resume_from.get("run_info") or {}).get("largest_batch"))
            cfg.validate()
        except UserError as err:
            raise UserError(str(err), echoed=err.echoed or env_rank() != 0) from None
        self.cfg = cfg
        self.backend = resolve_backend(cfg.device)
        if cfg.sync_bn and env_world_size() > 1 and not self.backend.is_cuda:  # SyncBatchNorm synchronises CUDA tensors only
            raise UserError(f"--sync-bn: synchronises BatchNorm over GPUs; this job of {env_world_size()} processes runs on "
                            f"{self.backend.device.type} (--device {cfg.device}): drop --sync-bn or run on GPUs", echoed=env_rank() != 0)
        self.dist: Dist = init_distributed(self.backend.device)
        self.regrouped = worlds is not None and worlds[0] != worlds[1]  # resumed by another process count, with epochs left
        if self.regrouped and self.dist.is_main:
            self.console.print(f"distill: resumed by {worlds[1]} process(es) (the run: {worlds[0]}): --batch-size {cfg.batch_size} x "
                               f"--grad-accum-steps {cfg.grad_accum_steps} keeps its global batch of "
                               f"{cfg.batch_size * worlds[1] * cfg.grad_accum_steps}", soft_wrap=True, highlight=False, markup=False)
        try:
            self._open_data(cfg)
            self._build_student(cfg)
            self._build_training(cfg)
            self._build_validation(cfg)
            self.start_epoch, self.start_step, self.rank_state = self._restore()
            self.dist.on_main(self._hold_run_dir)  # after every check: a refused start leaves no --out behind
        except BaseException:  # a refused run (any check below) releases the process group and the loader's threads too
            self.close()
            raise

    def _hold_run_dir(self) -> None:
        """Rank 0 locks --out for the run (a job started twice, e.g. requeued while the first still runs, would
        write one checkpoint from two runs) and removes the temp files a killed save left (a whole checkpoint each)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir}: is a file, not a run directory; choose another --out")
        self.run_lock = FileLock(
            self.run_dir / RUN_LOCK_NAME,
            busy=lambda pid: f"--out {self.run_dir}: another distill (pid {pid}) is running in this directory; wait for it to end or choose another --out",
            unwritable=lambda reason: f"--out {self.run_dir}: cannot write there ({reason}); choose a writable location",
        ).__enter__()
        for leftover in self.run_dir.glob(".*.tmp.*"):  # atomic_path's temp files: under the lock, no save is in flight
            leftover.unlink(missing_ok=True)

    def _open_data(self, cfg: DistillConfig) -> None:
        """The dataset, the label store and the checks that they go together and with this job."""
        self.device = self.backend.device
        self.precision = resolve_precision(cfg.precision, self.device)
        apply_numerics(self.device, self.precision, deterministic=cfg.deterministic, fixed_shapes=True)
        torch.manual_seed(cfg.seed)  # the same on every rank: D (not DDP-wrapped) must start identical everywhere

        self.index = self.dist.on_main(lambda: scan_image_folder(cfg.data))  # one scan per job, not per rank
        self.store = storage.open_store(cfg.labels, fingerprint=self.index.fingerprint, class_names=self.index.class_names,
                                        dataset_paths=self.index.paths, data=cfg.data)
        self._check_store_identity()
        self._check_decoder()
        self.class_names = self.store.class_names
        self.temperature = self.store.temperature

    def _build_student(self, cfg: DistillConfig) -> None:
        """The student (from --init or a checkpoint), its input normalisation, DDP, --compile and EMA wrappers."""
        self.student = self._load_student()
        self.head_reinitialized = bool(
            (self.resume_from.get("run_info") or {}).get("head_reinitialized") if self.resume_from is not None else self.student.head_reinitialized
        )
        if self.head_reinitialized and self.resume_from is None and self.dist.is_main:
            self.console.print(
                f"[yellow]--init {cfg.init}: {cfg.student}'s weights predict another number of classes than the store's "
                f"{self.store.num_classes}: its classifier was re-initialised and starts from random weights",
                soft_wrap=True,
            )
        self.norm = Normalization(size=training_size(self.student, cfg.image_size, int(self.store.attrs["crop"]["image_size"])),
                                  mean=tuple(self.student.mean), std=tuple(self.student.std))

        model = self.student.module.to(self.device)
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and self.backend.is_cuda)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.dist.active:  # the same state-dict keys: checkpoints and exports stay plain BatchNorm's
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp_model = torch.nn.parallel.DistributedDataParallel(model) if self.dist.active else model
        # --compile: the forward (and its backward) of the student through torch.compile; weights are shared
        self.forward_model = self.ddp_model
        if cfg.compile:
            self.forward_model = compiled(self.ddp_model, cfg.compile_backend, what=f"the student {cfg.student}",
                                          instead="drop --compile, or train an architecture spec (torchvision:ARCH, timm:ARCH)")
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None
        if self.ema is not None:  # the average starts at the init, as timm's ModelEma (AveragedModel's first update copies the model)
            self.ema.update_parameters(model)

    def _build_training(self, cfg: DistillConfig) -> None:
        """Losses, D, both optimisers, the loader of stored crops, the schedule and the run's log."""
        model = self.model
        self.loss = DistillLoss(cfg.hard_label_weight, temperature=self.temperature)
        self.mix_policy = MixPolicy(cutmix=cfg.cutmix, mixup=cfg.mixup, cutmix_alpha=cfg.cutmix_alpha, mixup_alpha=cfg.mixup_alpha)
        self.disc = DiscriminatorLoss(self.store.num_classes, mode=cfg.discriminator, topk=self.store.topk).to(self.device)
        self.optimizer = make_optimizer(cfg.opt, param_groups(model, cfg.weight_decay, cfg.norm_bias_weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                        on_cuda=self.backend.is_cuda)
        self.d_lr_fixed = cfg.d_lr_value()  # None: D follows the student's lr
        self.d_optimizer = make_discriminator_optimizer(
            self.disc, lr=cfg.lr if self.d_lr_fixed is None else self.d_lr_fixed, kind=cfg.d_optimizer, momentum=cfg.momentum
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(self.device, self.precision))  # fp16 on CUDA only
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
        # --grad-accum-steps N: the gradients of N consecutive batches make one optimiser step, each batch's loss
        # weighted by its share of the group's crops, so a group equals one batch N times larger (BatchNorm aside)
        self.batch_crops = self.loader.batch_crops()
        if min(self.batch_crops) < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            last = " (the epoch's last batch, here)" if cfg.batch_size * cfg.crops_per_step > 1 else ""
            raise UserError(f"--batch-size {cfg.batch_size}: the student's BatchNorm layers cannot train on a batch of one crop{last}; "
                            f"use --batch-size {3 if cfg.batch_size == 2 else 2} or more")
        self.accum = cfg.grad_accum_steps
        if self.accum > len(self.batch_crops):  # one short step per epoch, not the global batch the lr was scaled for
            raise UserError(f"--grad-accum-steps {self.accum}: an epoch has only {len(self.batch_crops)} batch(es) per process, so each "
                            f"optimiser step would see {len(self.batch_crops)}, not {self.accum}; use at most {len(self.batch_crops)}")
        self.scheduler = make_scheduler(self.optimizer, steps_per_epoch=self.optimizer_steps_per_epoch, epochs=cfg.epochs,
                                        warmup_epochs=cfg.warmup_epochs, schedule=cfg.schedule, min_lr_factor=cfg.min_lr / cfg.lr)
        self.log = RunLog(self.run_dir, self.console, enabled=self.dist.is_main, log_every=cfg.log_every, tensorboard=cfg.tensorboard,
                         discriminator=self.disc.enabled)
        self.log.plain = self.dist.broadcast(self.log.plain)  # every rank reads the means at rank 0's refresh steps

    def _build_validation(self, cfg: DistillConfig) -> None:
        """--val: scanned and probed once (rank 0) now, not after the first epoch's training; every rank
        then evaluates its share."""
        self.best = {"val_top1": None, "epoch": None}
        self.protocol = EvalProtocol.from_flags(cfg.resize_size, cfg.crop_pct, cfg.interpolation)
        self.protocol.check(self.norm.size)
        self.val_index = self.dist.on_main(lambda: scan_image_folder(cfg.val, flag="--val")) if cfg.val else None
        if self.val_index is not None:  # now, not after the first epoch's training
            class_mapping(self.val_index.class_names, self.class_names, flag="--val")
        self.val_ids = (
            self.dist.on_main(lambda: readable_images(self.val_index, self.backend, flag="--val", console=self.console)) if self.val_index else None
        )

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def _resume_checkpoint(self, cfg: DistillConfig) -> dict | None:
        """The checkpoint ``--resume`` continues (None for a fresh run)."""
        if not self.checkpoint_path.exists():
            return None
        if not cfg.resume:
            raise UserError(f"--out {self.run_dir}: holds a checkpoint already; pass --resume to continue it or choose another --out")
        return load_checkpoint(self.checkpoint_path, flag="--out")

    def _check_store_identity(self) -> None:
        ckpt = self.resume_from
        if ckpt is None:
            return
        recorded = ckpt.get("store_id")
        same = recorded == self.store.store_id if recorded else ckpt.get("store_fingerprint") == self.store.attrs["dataset"]["fingerprint"]
        if not same:
            raise UserError(
                f"--labels {self.cfg.labels}: not the label store the run in {self.run_dir} was trained from "
                f"(store id {self.store.store_id[:12]}, the run's is {str(recorded)[:12]}); pass that store, or start a new "
                f"run from the checkpoint: --init {self.checkpoint_path} --out NEW_DIR"
            )

    def _worlds(self) -> tuple[int, int] | None:
        """(the resumed run's process count, this job's) when the run has epochs left to train; None otherwise
        (a finished run trains nothing, whatever the count). --batch-size is per process, so another count
        regroups the global batch (``config.resumed_config``), and a checkpoint inside an epoch is continued
        from the same image of the epoch (``_regrouped_position``)."""
        ckpt = self.resume_from
        recorded = (ckpt.get("run_info") or {}).get("world_size")
        epochs = int((ckpt.get("config") or {}).get("epochs") or 0)
        if recorded is None or int(ckpt.get("epoch") or 0) >= epochs:
            return None
        return int(recorded), env_world_size()

    def _check_decoder(self) -> None:
        """The student must see the pixels the teachers saw: refuse another decoder backend (CPU vs nvJPEG
        decode differently) unless accepted knowingly; warn about other differences (GPU model, versions)."""
        stored = self.store.attrs.get("decoder") or {}
        current = decoder_record(self.backend, recorded_hw_load(stored))  # the loader replays with the store's load
        differing = decoder_differences(stored, current)
        if not differing:
            return
        detail = ", ".join(f"{k} {stored.get(k)!r} in the store vs {current.get(k)!r} here" for k in differing[:3])
        if differing[0] == "backend" and not self.cfg.allow_decoder_mismatch:
            raise UserError(
                f"--labels {self.cfg.labels}: made with the {stored.get('backend')!r} JPEG decoder but this run decodes with "
                f"{current['backend']!r} (--device {self.cfg.device}): the student would see other pixels than the teachers; "
                "train on the store's device, or pass --allow-decoder-mismatch to accept it"
            )
        if self.dist.is_main:
            self.console.print(f"[yellow]--labels {self.cfg.labels}: decoded pixels may differ slightly from the teachers' ({detail})", soft_wrap=True)

    def _load_student(self):
        """The student: from ``--init`` for a fresh run, from the checkpoint's weights on resume (so a
        since-deleted ``--init`` file does not matter)."""
        spec = parse_spec(self.cfg.student)
        self.init_weights = "raw"
        if self.resume_from is not None:
            self.init_weights = (self.resume_from.get("run_info") or {}).get("init_weights", "raw")  # a TorchScript student is its own file; its trained weights are loaded in _restore
            init = "weights" if spec.source == "torchscript" else str(self.checkpoint_path)
            return load_model(spec, num_classes=self.store.num_classes, init=init)
        loaded = load_model(spec, num_classes=self.store.num_classes, init=self.cfg.init)
        if self.cfg.init not in INIT_MODES:  # a file: a distill checkpoint's EMA weights are what its validation chose
            self.init_weights = init_from_ema(loaded, self.cfg.init, self.cfg.init_weights)
        return loaded

    def _restore(self) -> tuple[int, int, dict | None]:
        """(epochs done, steps done in the next epoch, this rank's saved RNG states and sums in that epoch or None)."""
        ckpt = self.resume_from
        self.pending_record = None  # a resumed epoch's record whose validation has not run yet
        if ckpt is None:
            return 0, 0, None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and self.scaler.is_enabled():  # a resume may change --device/--precision
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.disc.enabled:
            if ckpt.get("discriminator") is None or ckpt.get("d_optimizer") is None:
                raise UserError(
                    f"--out {self.run_dir}: its checkpoint has no discriminator state (the run used --discriminator off); "
                    f"resume it with --discriminator off, or start a new run: --init {self.checkpoint_path} --out NEW_DIR"
                )
            self.disc.load_state_dict(ckpt["discriminator"])
            self.d_optimizer.load_state_dict(ckpt["d_optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(int(ckpt["ema_updates"]))
        self.best = dict(ckpt.get("best") or self.best)
        self.pending_record = ckpt.get("pending_record")
        epoch, step, ranks = int(ckpt["epoch"]), int(ckpt.get("epoch_step") or 0), ckpt.get("ranks")
        if not self.regrouped:
            return epoch, step, (ranks[self.dist.rank] if step else None)
        # another process count (the global batch regrouped): the same optimiser step, the same image of the epoch
        done = epoch * self.optimizer_steps_per_epoch
        if step:
            step, state = self._regrouped_position(step, ranks, ckpt.get("config") or {})
            done += step // self.accum
        else:
            state = None
        restart_schedule_at(self.scheduler, done)
        return epoch, step, state

    def _regrouped_position(self, step: int, ranks: list[dict], recorded: dict) -> tuple[int, dict]:
        """A checkpoint saved after ``step`` batches of an epoch by ``len(ranks)`` processes of ``recorded``'s
        batch: the batch of this job's plan that starts at the same image of the epoch (its images are the same:
        the job's global batches are consecutive runs of the epoch's order), and the epoch's sums so far, all on
        rank 0 (they are summed over the ranks). The dropout masks from there on are this job's own draws."""
        world = len(ranks)
        images = self.loader.batch_starts(world, int(recorded["batch_size"]))[step]
        starts = self.loader.batch_starts(self.dist.world_size, self.cfg.batch_size)
        saved = [r["sums"] for r in ranks]
        if images not in starts or starts.index(images) % self.accum or any(s.numel() != len(SUMS) + 1 for s in saved):
            raise UserError(f"--out {self.run_dir}: the run stopped inside an epoch at a point {self.dist.world_size} process(es) cannot "
                            f"continue from exactly; resume it with {world} process(es), or start a new run from its weights: "
                            f"--init {self.checkpoint_path} --out NEW_DIR", echoed=not self.dist.is_main)
        sums = torch.stack([s.to(torch.float64) for s in saved]).sum(0) if self.dist.is_main else torch.zeros(len(SUMS) + 1, dtype=torch.float64)
        return starts.index(images), {"sums": sums, "rng_cpu": None, "rng_cuda": None}

    @property
    def run_info(self) -> dict:
        """Facts about the run that are not flags, recorded in checkpoints, config.json and metrics."""
        return {
            "store_id": self.store.store_id,
            "temperature": self.temperature,
            "head_reinitialized": self.head_reinitialized,
            "precision": self.precision,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "largest_batch": max(self.cfg.batch_size, int(((self.resume_from or {}).get("run_info") or {}).get("largest_batch") or 0)),
            "dali_threads": dali_threads(self.cfg.num_threads, self.backend),
            "init_weights": self.init_weights,
        }

    def _checkpoint(self, epoch: int, step: int = 0, ranks: list[dict] | None = None, pending: dict | None = None) -> dict:
        """The checkpoint after ``epoch`` whole epochs and ``step`` steps of the next one (``ranks``: every
        rank's RNG states and running sums at that step; only when ``step`` > 0). ``pending``: the training
        record of epoch ``epoch``, whose validation has not run yet (``--resume`` runs it first)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "epoch": epoch,
            "epoch_step": step,
            "ranks": ranks,
            "pending_record": pending,
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
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
            "best": dict(self.best),
            "config": as_record(self.cfg),
            "run_info": self.run_info,
            "store_id": self.store.store_id,
            "store_fingerprint": self.store.attrs["dataset"]["fingerprint"],
        }

    # -- training -----------------------------------------------------------------------------
    def _reduce_discriminator_grads(self) -> None:
        if not (self.dist.active and self.disc.enabled):
            return
        grads = [p.grad for p in self.disc.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for D's few small tensors, not one each
        torch_dist.all_reduce(flat)
        flat /= self.dist.world_size
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))

    def losses(self, logits: torch.Tensor, batch: Batch) -> tuple[DistillLossParts, DiscriminatorTerms]:
        """The step's loss parts and discriminator terms for ``logits`` of ``batch``: the soft term at the
        store's temperature, the hard term on the crops' classes, D on the student's softmax at T."""
        parts = self.loss.parts(logits, batch.labels, batch.classes)
        terms = self.disc(logits.float() / self.temperature, batch.labels)
        return parts, terms

    def train_step(self, batch: Batch, *, weight: float = 1.0, first: bool = True, last: bool = True) -> torch.Tensor:
        """Forward and backward of ``batch``, its loss scaled by ``weight``; ``first``: the first batch of an
        optimiser step (gradients start from zero), ``last``: its last (gradients are reduced over the ranks
        and both optimisers step). The defaults are one whole step. Returns the batch's SUMS values as a
        device tensor (no host sync)."""
        batch, _, _ = mix(batch, self.mix_policy, self.store.num_classes)
        images = batch.images.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.images
        if first:
            self.optimizer.zero_grad(set_to_none=True)
            if self.d_optimizer is not None:
                self.d_optimizer.zero_grad(set_to_none=True)
        # DDP reduces gradients in the backward of the group's last batch only (the forward belongs in no_sync too)
        accumulating = not last and isinstance(self.ddp_model, torch.nn.parallel.DistributedDataParallel)
        with self.ddp_model.no_sync() if accumulating else nullcontext():
            with autocast_for(self.device, self.precision):
                logits = self.forward_model(images)
            parts, terms = self.losses(logits, batch)
            total = parts.total + terms.d_term
            self.scaler.scale(total if weight == 1.0 else total * weight).backward()
        if last:
            self._optimizer_step()
        hard = parts.hard if parts.hard is not None else torch.zeros_like(parts.soft)
        with torch.no_grad():
            return torch.stack([parts.soft.detach(), hard.detach(), terms.d_loss, terms.d_acc, teacher_agreement(logits.detach(), batch.labels)]).double()

    def _optimizer_step(self) -> None:
        """The step of both optimisers on the accumulated gradients, then the schedule and the EMA."""
        self._reduce_discriminator_grads()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not loss-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        if self.d_optimizer is not None:
            self.scaler.step(self.d_optimizer)
        self.scaler.update()
        self.scheduler.step()
        self._follow_student_lr()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """Optimiser steps per epoch: the epoch's batches in groups of --grad-accum-steps (the last may be shorter)."""
        return -(-len(self.batch_crops) // self.accum)

    def _lrs(self) -> tuple[float, float | None]:
        """The student's and the discriminator's current learning rates (None: no discriminator)."""
        return self.optimizer.param_groups[0]["lr"], self.d_optimizer.param_groups[0]["lr"] if self.d_optimizer is not None else None

    def _accumulation(self, step: int) -> tuple[float, bool, bool]:
        """(loss weight, first, last) of the epoch's batch ``step`` within its --grad-accum-steps group."""
        start = step - step % self.accum
        stop = min(start + self.accum, len(self.batch_crops))
        return self.batch_crops[step] / sum(self.batch_crops[start:stop]), step == start, step + 1 == stop

    def _job_means(self, sums: torch.Tensor) -> dict[str, float]:
        """The job's means per crop of every rank's running sums (SUMS weighted by crops, then the crop count;
        a collective under torchrun): what progress lines, TensorBoard and metrics show. Weighted by crops, as
        timm's meters: an epoch's short last batch (or a rank's share of it) counts for its crops, not as a whole batch."""
        job = sums
        if self.dist.active:
            job = sums.clone()
            torch_dist.all_reduce(job)
        return dict(zip(SUMS, (job[:-1] / job[-1].clamp(min=1)).tolist()))

    def _check_finite(self, means: dict[str, float], epoch: int, step: int, lr: float, probe: torch.Tensor | None = None) -> dict[str, float]:
        """``means``, unless the run diverged: the loss is NaN or infinite (without fp16's scaler the optimiser has
        applied that gradient), or, before a save (``probe``: a few of the last batch's images), the student's
        outputs are. A loss is measured before its step's update, so an update that breaks the weights (to 1e29:
        finite, but the next loss NaN) shows only in the weights themselves. The run then stops with one line
        before anything is saved or validated (every rank: the means are the job's). timm and DeiT stop the same way."""
        if math.isfinite(means["loss"]) and (probe is None or not self._outputs_broken(probe)):
            return means
        what = f"the loss is {means['loss']}" if not math.isfinite(means["loss"]) else "the student's outputs are not finite"
        if self.checkpoint_path.exists():
            then = (f"{self.checkpoint_path} still holds the last good point. Lower --lr (or set --clip-grad) and start again, or "
                    f"from that point: --init {self.checkpoint_path} --out NEW_DIR")
        else:
            then = "nothing was saved. Lower --lr (or set --clip-grad) and start again"
        raise UserError(f"distill: training diverged: {what} by step {step} of epoch {epoch + 1} (lr {lr:.4g}); {then}",
                        echoed=not self.dist.is_main)

    def _outputs_broken(self, images: torch.Tensor) -> bool:
        """Whether the student's outputs on ``images`` hold a NaN or infinity on any rank. In training mode, as the next
        step would run it (eval mode's running statistics can be far off early in a run: a healthy toy run gave inf);
        in float32 (fp16 may overflow where the weights are sound: its scaler skips such steps); and without side
        effects: the RNG is forked and BatchNorm's running statistics are put back."""
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        try:
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.backend.is_cuda else []), torch.no_grad():
                broken = (~torch.isfinite(self.model(images.float()).float())).any().to(torch.float64)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        if self.dist.active:
            torch_dist.all_reduce(broken)
        return bool(broken.item())

    def _resumed_sums(self, saved: torch.Tensor, start_step: int) -> torch.Tensor:
        """The running sums a checkpoint saved inside an epoch; one written before the sums were weighted by
        crops (one entry per SUMS name) is converted with this rank's mean batch so far."""
        saved = saved.to(self.device, torch.float64)
        if saved.numel() == len(SUMS):
            crops = float(sum(self.batch_crops[:start_step]))
            saved = torch.cat([saved * (crops / max(1, start_step)), saved.new_tensor([crops])])
        return saved

    def train_epoch(self, epoch: int, report, stop: GracefulStop | None = None, start_step: int = 0, state: dict | None = None) -> dict:
        """One epoch from step ``start_step`` (``state``: this rank's RNG states and sums saved at that
        step); ``report(step, crops, means or None, lr)`` is called after every step. A stop agreed
        by every rank before the epoch's last step saves that point and raises StopRequested."""
        self.ddp_model.train()
        # per rank and epoch (independent dropout masks across ranks; a resumed epoch redraws the same)
        torch.manual_seed(seed_for(self.cfg.seed, self.dist.rank, epoch))
        sums = torch.zeros(len(SUMS) + 1, dtype=torch.float64, device=self.device)  # SUMS x crops, then crops; on the device: no per-step host sync
        if state is not None:  # continue the epoch where it stopped: the same draws from here on, the same sums
            if state.get("rng_cpu") is not None:  # None: saved by another process count, whose draws do not map
                torch.set_rng_state(state["rng_cpu"])
            if self.backend.is_cuda and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
            sums += self._resumed_sums(state["sums"], start_step)
        steps_total = self.loader.steps_per_epoch()
        steps, crops, scalars_due = start_step, 0, False
        lr, d_lr = self._lrs()
        times = StageTimes()  # the training thread's wait for the loader (input-bound if large)
        started = time.perf_counter()
        probe = None
        for batch in times.waiting(self.loader.epoch(epoch, start_step), "loader"):
            weight, first, last = self._accumulation(steps)
            if batch.images.shape[0] != self.batch_crops[steps]:
                raise RuntimeError(f"batch {steps} holds {batch.images.shape[0]} crops, the loader planned {self.batch_crops[steps]}")
            lr, d_lr = self._lrs()  # what this step trains with (its optimiser step then moves the schedule on)
            n = batch.images.shape[0]
            values = self.train_step(batch, weight=weight, first=first, last=last)
            probe = batch.images[:PROBE_IMAGES]
            if self.scaler.is_enabled():  # fp16: the scaler skips a step whose gradients overflowed; its batch stays out of the means
                finite = torch.isfinite(values).all()
                sums[:-1] += torch.where(finite, values * n, 0.0)
                sums[-1] += finite * n
            else:  # a non-finite loss has reached the weights: _check_finite stops the run at the next look at the means
                sums[:-1] += values * n
                sums[-1] += n  # a scalar on the device's tensor: no host-to-device copy per step
            kill_point("distill-step")
            steps += 1
            crops += n
            refresh = self.log.wants_means(steps, steps_total)
            scalars_due = scalars_due or refresh  # TensorBoard's x is the optimiser step: its point waits for the step's last batch
            means = self._check_finite(self._job_means(sums), epoch, steps, lr) if refresh or (scalars_due and last) else None
            if scalars_due and last:
                self.log.scalars(means, lr, int(self.scheduler.last_epoch))
                scalars_due = False
            report(steps, n * self.dist.world_size, means if refresh else None, lr)
            if not last:  # inside a --grad-accum-steps group: a checkpoint holds whole optimiser steps only
                continue
            decision = stop.after_step() if stop is not None else None
            if decision is not None and (decision.stop or decision.save) and steps < steps_total:
                self._check_finite(self._job_means(sums), epoch, steps, lr, probe)  # never save diverged weights
                self._save_inside_epoch(epoch, steps, sums)
                if decision.stop:
                    raise self._stopped(stop, f"step {steps}/{steps_total} of epoch {epoch + 1}", "that point", "continue from the next step")
        elapsed = time.perf_counter() - started
        # the epoch's global means, not rank 0's shard; and the weights about to be validated and saved
        means = self._check_finite(self._job_means(sums), epoch, steps, lr, probe)
        record = {
            "epoch": epoch + 1,
            "loss": means["loss"],
            "d_loss": means["d_loss"],
            "d_acc": means["d_acc"],
            "teacher_agreement": means["agreement"],
            "lr": lr,  # of the epoch's last step
            "d_lr": d_lr,
            "temperature": self.temperature,
            "crops_per_s": crops * self.dist.world_size / max(elapsed, 1e-9),
            "seconds": elapsed,
            "loader_wait_s": times.get("loader"),
        }
        if self.loss.hard_label_weight > 0:
            record["hard_loss"] = means["hard_loss"]
        if self.head_reinitialized:
            record["head_reinitialized"] = True
        return record

    def _stopped(self, stop: GracefulStop, after: str, holds: str, then: str) -> StopRequested:
        """The agreed stop after ``after`` (its checkpoint just written): one line on rank 0, naming what the
        checkpoint ``holds`` and what ``--resume`` does ``then``; an empty message elsewhere."""
        message = (f"distill: stopped by {stop.signal_name} after {after}; {self.checkpoint_path} holds {holds}: "
                   f"rerun the same command with --resume to {then}")
        return StopRequested(message if self.dist.is_main else "", stop.agreed_signum)

    def _save_inside_epoch(self, epoch: int, steps: int, sums: torch.Tensor) -> None:
        """Save the run after ``steps`` steps of ``epoch``, with every rank's RNG states and running sums,
        so ``--resume`` continues from the next step exactly (collective)."""
        state = {
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.backend.is_cuda else None,
            "sums": sums.cpu(),
        }
        ranks = self.dist.gather(state)
        if self.dist.is_main:
            self._write(lambda: save_atomic(self._checkpoint(epoch, steps, ranks), self.checkpoint_path), f"step {steps} of epoch {epoch + 1}")
            self.saved_at = time.monotonic()
        self.dist.barrier()

    def _write(self, write, what: str) -> None:
        """Run a checkpoint write; a failed write is a UserError naming ``what`` (the previous checkpoint is intact)."""
        try:
            write()
        except OSError as err:
            raise UserError(
                f"--out {self.run_dir}: writing the {what} checkpoint failed ({err.strerror or err}); "
                "free space or choose another --out, then rerun with --resume (the previous checkpoint is intact)"
            ) from None

    def _follow_student_lr(self) -> None:
        """``--d-lr student``: D's lr is the student's current lr (what the official code's per-epoch reset did)."""
        if self.d_lr_fixed is None and self.d_optimizer is not None:
            for group in self.d_optimizer.param_groups:
                group["lr"] = self.optimizer.param_groups[0]["lr"]

    def _share_rank0_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics) of the student and its EMA. DDP sends
        rank 0's buffers at the start of each forward, so each rank's last training forward left its own
        statistics: the ranks would validate different models, none exactly the one rank 0 saves, and
        the logged accuracy (and best.pt's choice) would be a mix of them."""
        if not self.dist.active:
            return
        for module in (self.model, *([self.ema.module] if self.ema is not None else [])):
            for buffer in module.buffers():
                torch_dist.broadcast(buffer, src=0)

    def validation_due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a validation: every --eval-every epochs and at the end."""
        return self.val_index is not None and not ((epoch + 1) % self.cfg.eval_every and epoch + 1 != self.cfg.epochs)

    def validate(self, epoch: int) -> dict:
        """Validation top-1/top-5 of the raw weights (and of the EMA weights), when due (:meth:`validation_due`)."""
        cfg = self.cfg
        if not self.validation_due(epoch):
            return {}
        self._share_rank0_buffers()
        models = {"val": self.model} | ({"val_ema": self.ema.module} if self.ema is not None else {})
        # one decode of the validation images for the raw and the EMA weights
        results = evaluate_models(models, self.val_index, self.class_names, self.norm, self.backend, batch_size=cfg.batch_size,
                                  num_threads=cfg.num_threads, ids=self.val_ids, flag="--val", dist=self.dist, precision=self.precision,
                                  protocol=self.protocol)
        out = {}
        for prefix, result in results.items():
            out.update({f"{prefix}_top1": result["top1"], f"{prefix}_top5": result["top5"]})
        return out

    def _save(self, epoch: int, record: dict) -> None:
        """checkpoint.pt every epoch; best.pt when the validation top-1 (EMA weights if any) improves;
        epoch_NNNN.pt every --keep-every epochs. Each file is written whole or not at all, checkpoint.pt last:
        a checkpoint that records an epoch has that epoch's best.pt and epoch_NNNN.pt beside it (a failed or
        killed write before it leaves the previous checkpoint, whose resume redoes this epoch's end; the
        snapshot was lost for good when it came after)."""
        score = record.get("val_ema_top1", record.get("val_top1"))
        improved = score is not None and (self.best["val_top1"] is None or score > self.best["val_top1"])
        previous = self.best
        if improved:
            self.best = {"val_top1": score, "epoch": epoch + 1}
        kept = self.cfg.keep_every and (epoch + 1) % self.cfg.keep_every == 0
        copies = [self.run_dir / BEST_NAME] * bool(improved) + [self.run_dir / f"epoch_{epoch + 1:04d}.pt"] * bool(kept)
        try:
            first, *rest = [*copies, self.checkpoint_path]
            save_atomic(self._checkpoint(epoch + 1), first)
            for path in rest:
                kill_point("distill-copy")
                copy_atomic(first, path)
        except BaseException:
            self.best = previous
            raise

    def _save_before_validation(self, epoch: int, record: dict) -> None:
        """Save epoch ``epoch``'s training, its record pending, before its validation runs (collective): a stop
        signal or a crash while validating (ImageNet's 50,000 images, twice with EMA, outlast a 30 s grace
        period) then costs the validation only, which ``--resume`` runs first."""
        if self.dist.is_main:
            self._write(lambda: save_atomic(self._checkpoint(epoch + 1, pending=record), self.checkpoint_path), f"epoch {epoch + 1}")
            self.saved_at = time.monotonic()
        self.dist.barrier()

    def run(self) -> list[dict]:
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # an epoch saved with its validation pending may have logged its line already: it is logged again
            self.log.trim(self.start_epoch - (1 if self.pending_record is not None else 0))
            self.log.write_config({"config": as_record(cfg), "run_info": self.run_info, "labels_url": self.store.url,
                                   "started_epoch": self.start_epoch, "val_protocol": self.protocol.describe(self.norm.size)})
        records = []
        steps = self.loader.steps_per_epoch()
        if self.dist.is_main and (self.start_epoch < cfg.epochs or self.pending_record is not None):  # else nothing to train
            self.console.print(self.describe(), soft_wrap=True, highlight=False, markup=False)
        self.saved_at = time.monotonic()  # rank 0: when the last checkpoint was written (--checkpoint-minutes)
        due = (lambda: time.monotonic() - self.saved_at >= cfg.checkpoint_minutes * 60) if cfg.checkpoint_minutes > 0 else (lambda: False)
        try:
            with GracefulStop(self.dist, due) as stop, self.log.progress(cfg.epochs, cfg.batch_size) as progress:
                wall: list[float] = []  # this process's seconds per epoch (training, validation, checkpoint): the ETA

                def end_epoch(epoch: int, record: dict, started: float | None) -> None:
                    """Validate (when due), log, save; ``started``: when the epoch began (None: not a whole epoch)."""
                    record.update(self.validate(epoch))
                    if self.dist.is_main:
                        def finish_epoch() -> None:
                            self.log.epoch_record(record, int(self.scheduler.last_epoch))
                            kill_point("distill-checkpoint")
                            self._save(epoch, record)

                        self._write(finish_epoch, f"epoch {epoch + 1}")
                        self.saved_at = time.monotonic()
                        if started is not None:  # a partial epoch says little about a whole one
                            wall.append(time.perf_counter() - started)
                        progress.print(_format_record(record, self.disc.enabled) + _eta(wall, cfg.epochs - epoch - 1))
                    self.dist.barrier()
                    records.append(record)

                if self.pending_record is not None:  # stopped between an epoch's training and its validation
                    end_epoch(self.start_epoch - 1, dict(self.pending_record), None)
                for epoch in range(self.start_epoch, cfg.epochs):
                    epoch_started = time.perf_counter()
                    resumed = epoch == self.start_epoch and self.start_step > 0  # the checkpoint resumed from is inside this epoch
                    first = self.start_step if resumed else 0
                    record = self.train_epoch(epoch, progress.epoch(epoch, steps, done=first), stop, first, self.rank_state if resumed else None)
                    if self.validation_due(epoch):
                        self._save_before_validation(epoch, record)
                        if stop.at_epoch_end():
                            raise self._stopped(stop, f"epoch {epoch + 1}/{cfg.epochs}'s training", "it", "validate it and continue")
                    end_epoch(epoch, record, None if resumed else epoch_started)
                    if epoch + 1 < cfg.epochs and stop.at_epoch_end():
                        raise self._stopped(stop, f"epoch {epoch + 1}/{cfg.epochs}", "it", "continue")
        finally:
            self.loader.close()
            self.log.close()
        return records

    def describe(self) -> str:
        """One line on what this run trains and how (printed at its start: a cluster log then says it all)."""
        cfg, world, accum = self.cfg, self.dist.world_size, self.accum
        batch = f"{world} process(es) x batch {cfg.batch_size}" + (f" x {accum} accumulated" if accum > 1 else "")
        start = f"resumed at epoch {self.start_epoch + 1}" + (f" step {self.start_step}" if self.start_step else "") if self.resume_from else f"--init {cfg.init}" + (" (its EMA weights)" if self.init_weights == "ema" else "")
        return (f"distill: {cfg.student} ({start}) on {len(self.loader.usable):,} images, {cfg.crops_per_step} stored "
                f"crop{'s' if cfg.crops_per_step > 1 else ''} per image per step at {self.norm.size} px, store T={self.temperature:g}; {batch} = global batch {cfg.batch_size * world * accum:,}, "
                f"{self.optimizer_steps_per_epoch:,} optimiser step{'s' if self.optimizer_steps_per_epoch != 1 else ''} per epoch"
                + (f" ({len(self.batch_crops):,} batches per process, which the progress counts)" if accum > 1 else "") + f", lr {cfg.lr:g} ({cfg.opt}, {cfg.schedule}); "
                f"{self.device} {self.precision}, {dali_threads(cfg.num_threads, self.backend)} DALI threads")

    def close(self) -> None:
        """Release what the run holds: the loader's threads and TensorBoard writer (also after a failed start), the
        process group, --out's lock."""
        for part in ("loader", "log"):
            if hasattr(self, part):
                getattr(self, part).close()
        shutdown(self.dist)
        if hasattr(self, "run_lock"):
            self.run_lock.__exit__(None, None, None)


def training_size(student, image_size: int | None, crop_size: int) -> int:
    """The crops' side the student trains on: --image-size, else the student spec's ``:size=``, else the size a
    fixed-size student takes (a static .pt2, a torchvision ViT), else the store's crop size. A fixed-size
    student at another size is refused here (it failed in its first step, with a traceback)."""
    size = image_size or student.spec.size or (student.input_size if student.size_fixed else None) or crop_size
    if student.size_fixed and size != student.input_size:
        raise UserError(f"--image-size {size}: the student {student.spec.text} takes {student.input_size}x{student.input_size} images "
                        "only; drop --image-size, or use a student exported with dynamic H/W (or an architecture spec)")
    return size


def _eta(wall: list[float], epochs_left: int) -> str:
    """'  (N epochs left, ~T)': the run's ETA from the mean of the whole epochs this process timed ('' when none is left or timed)."""
    if not wall or epochs_left <= 0:
        return ""
    return f"  ({epochs_left} epoch{'s' if epochs_left > 1 else ''} left, ~{format_duration(sum(wall) / len(wall) * epochs_left)})"


def _format_record(record: dict, discriminator: bool) -> str:
    text = (f"epoch {record['epoch']}: loss {record['loss']:.4f}" + (d_text(record["d_loss"], record["d_acc"]) if discriminator else "")
            + f"  agree {record['teacher_agreement']:.1%}  {record['crops_per_s']:.0f} crops/s")
    if "val_top1" in record:
        text += f"  val top-1 {record['val_top1']:.2%} top-5 {record['val_top5']:.2%}"
    if "val_ema_top1" in record:
        text += f"  EMA top-1 {record['val_ema_top1']:.2%}"
    return text


def run_distill(cfg: DistillConfig, console: Console | None = None, *, explicit: set[str] | None = None) -> list[dict]:
    trainer = Trainer(cfg, console, explicit=explicit)
    try:
        return trainer.run()
    finally:
        trainer.close()
