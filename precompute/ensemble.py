"""The teacher ensemble: weighted average of softmax(logits / T) over teachers."""
from __future__ import annotations

import math

import torch

from mealkd.core.accel import apply_numerics, as_model_input, autocast_for, compiled, resolve_precision
from mealkd.core.models import LoadedModel, describe
from mealkd.core.models.inference import fold_batchnorm
from mealkd.core.replay import Normalization
from mealkd.errors import UserError


def check_class_order(teachers: list[LoadedModel], class_names: list[str], *, flag: str = "--data") -> None:
    """A teacher whose checkpoint records its class names must list them in the dataset's order
    (output j of the teacher must mean class j of the store); teachers without names are trusted."""
    for t in teachers:
        if t.class_names is None or list(t.class_names) == list(class_names):
            continue
        if len(t.class_names) != len(class_names):
            raise UserError(f"--teachers: teacher {t.spec.text} records {len(t.class_names)} class names but {flag} has "
                            f"{len(class_names)} classes; use a teacher trained on these classes")
        pos = next(j for j, (a, b) in enumerate(zip(t.class_names, class_names)) if a != b)
        raise UserError(
            f"--teachers: teacher {t.spec.text} orders its classes differently from {flag}: output {pos} is "
            f"{t.class_names[pos]!r} in its checkpoint's class_names but class {pos} of {flag} is {class_names[pos]!r}; "
            "reorder the teacher's classifier rows (and its class_names) to the dataset's sorted class order, or retrain it"
        )


def check_temperature(temperature: float) -> None:
    """--temperature: a finite number > 0 (NaN fails '> 0'; NaN or inf would blame the teachers' weights)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"--temperature {temperature}: must be a finite number > 0")


class TeacherEnsemble:
    """Teachers grouped by input normalisation, so each distinct (size, mean, std) is cut once.

    A teacher's input size is its ``:size=N`` (or its architecture's one fixed size), else
    ``default_size``: precompute's ``--image-size``, the crop size the store records (the rule is
    in ``core.models``). With ``class_names`` (the dataset's), teachers whose checkpoints record
    class names must list them in that order (:func:`check_class_order`). Each teacher's BatchNorm is
    folded into its convolutions (``fold=False`` keeps it, to measure what folding saves); with
    ``compile_backend`` each teacher then runs through ``torch.compile`` (``--compile``)."""

    def __init__(self, teachers: list[LoadedModel], *, default_size: int, temperature: float, device: torch.device,
                 class_names: list[str] | None = None, flag: str = "--data", precision: str = "auto", fold: bool = True,
                 compile_backend: str | None = None):
        check_temperature(temperature)
        counts = {t.num_classes for t in teachers}
        if len(counts) > 1:
            detail = ", ".join(f"{t.spec.text} -> {t.num_classes}" for t in teachers)
            raise UserError(f"--teachers: the teachers disagree on the number of classes ({detail}); use teachers trained on the same label set")
        if class_names is not None:
            check_class_order(teachers, class_names, flag=flag)
        self.teachers = teachers
        self.num_classes = counts.pop()
        self.temperature = temperature
        self.device = device
        self.precision = resolve_precision(precision, device)  # the teachers' autocast dtype, recorded in the store
        # fp32 on a GPU: no TF32 either; teacher batches have one shape (but a shard's last), so cuDNN autotunes
        apply_numerics(device, self.precision, fixed_shapes=True)
        self.fp32_fallbacks = 0  # batches a teacher overflowed in reduced precision and was rerun in fp32
        self.norms: list[Normalization] = []
        self.norm_of: list[int] = []
        for t in teachers:
            norm = Normalization(size=t.input_size or default_size, mean=tuple(t.mean), std=tuple(t.std))
            if norm not in self.norms:
                self.norms.append(norm)
            self.norm_of.append(self.norms.index(norm))
        total = sum(t.spec.weight for t in teachers)
        self.weights = [t.spec.weight / total for t in teachers]
        self.folded: list[bool] = []  # per teacher: BatchNorm folded into its convolutions (same outputs, fewer kernels)
        for t, norm_index in zip(teachers, self.norm_of):
            t.module, folded = fold_batchnorm(t.module.eval(), self.norms[norm_index].size) if fold else (t.module.eval(), False)
            self.folded.append(folded)
            t.module.to(device)
            if device.type == "cuda":
                t.module.to(memory_format=torch.channels_last)
            if compile_backend is not None:  # after folding: the compiled graph is the folded one
                t.module = compiled(t.module, compile_backend, what=f"teacher {t.spec.text}",
                                    instead="drop --compile (it applies to every teacher), or pass the teacher as an architecture spec")

    def describe(self) -> list[dict]:
        return [describe(t) for t in self.teachers]

    def launch(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Averaged probabilities (B, C) float32 and each teacher's "all finite" flag (T,) bool, both
        left on the device: nothing here waits for the GPU, so the next batch is prepared while the
        teachers run. A batch whose flags are not all true must be recomputed with ``__call__``."""
        return self._average(inputs, checked=False)

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Averaged probabilities (B, C) float32 for crops given once per normalisation; a teacher's
        fp16/bf16 overflow is rerun in fp32, NaN/Inf in fp32 is a UserError (waits for each teacher)."""
        return self._average(inputs, checked=True)[0]

    @torch.inference_mode()
    def _average(self, inputs: list[torch.Tensor], *, checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        average, finite = None, []
        for teacher, weight, norm_index in zip(self.teachers, self.weights, self.norm_of):
            x = as_model_input(inputs[norm_index])
            with autocast_for(self.device, self.precision):
                logits = teacher.module(x)
            probs = torch.softmax(logits.float() / self.temperature, dim=1)
            if checked:
                probs = self._checked(teacher, x, probs)
            finite.append(torch.isfinite(probs).all())
            average = probs * weight if average is None else average + probs * weight
        return average, torch.stack(finite)

    def _checked(self, teacher: LoadedModel, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` if finite; an fp16/bf16 overflow is not bad weights: this batch of this teacher is
        rerun in fp32; NaN/Inf in fp32 is."""
        if not torch.isfinite(probs).all() and self.precision != "fp32":
            self.fp32_fallbacks += 1
            probs = torch.softmax(teacher.module(x).float() / self.temperature, dim=1)
        if not torch.isfinite(probs).all():
            raise UserError(
                f"--teachers: teacher {teacher.spec.text} produced NaN/Inf outputs in fp32; check its weights file "
                "(nothing was marked done for the batch)"
            )
        return probs
