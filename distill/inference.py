"""Load a trained student from a checkpoint and evaluate it."""
from __future__ import annotations

import os

from core.checkpoint_io import load_torch_file
from core.accel import resolve_precision
from core.dali_io import resolve_backend
from core.dataset import scan_image_folder
from core.models import load_model, parse_spec
from core.replay import Normalization
from distill.checkpoint import is_checkpoint
from distill.evaluate import evaluate, readable_images
from storage.errors import UserError


def load_student(checkpoint: str, *, student: str | None = None, num_classes: int | None = None):
    """(LoadedModel, class names or None, training Normalization or None) from a checkpoint file.

    The architecture comes from ``student`` or the checkpoint's own student spec; for a TorchScript
    student that is its .pt file, into which the checkpoint's state dict is loaded."""
    raw = load_torch_file(checkpoint, "--checkpoint")
    is_ours = is_checkpoint(raw)
    spec_text = student or (raw.get("student_spec") if is_ours else None)
    if spec_text is None:
        raise UserError(f"--checkpoint {checkpoint}: a plain state dict needs --student ARCH spec (e.g. torchvision:resnet18)")
    spec = parse_spec(spec_text)
    if student is None and spec.source == "torchscript" and not os.path.isfile(os.path.expanduser(spec.weights_file or "")):
        raise UserError(f"--checkpoint {checkpoint}: its student is the TorchScript file {spec.weights_file}, which is not there "
                        "(moved, or a relative path from another directory); pass it with --student PATH.pt")
    loaded = load_model(spec, num_classes=raw["num_classes"] if is_ours else num_classes, init=checkpoint)  # None: read from the file
    norm = Normalization(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["norm"].items()}) if is_ours else None
    class_names = raw.get("class_names") if is_ours else None
    return loaded, class_names, norm


def evaluate_checkpoint(data: str, checkpoint: str, *, student: str | None = None, image_size: int | None = None,
                        batch_size: int = 64, device: str = "auto", per_class: bool = False, console=None,
                        class_names: list[str] | None = None, precision: str = "auto") -> dict:
    """Evaluate a checkpoint on ``data``. Class names come from a mealkd checkpoint, else ``class_names``
    (the training classes, in training order), else the validation tree's own classes."""
    index = scan_image_folder(data)
    loaded, ckpt_names, norm = load_student(checkpoint, student=student)
    class_names = ckpt_names or loaded.class_names or class_names or index.class_names
    if len(class_names) != loaded.num_classes:
        raise UserError(
            f"--checkpoint {checkpoint}: the model has {loaded.num_classes} classes but {data} has {len(class_names)}; "
            "evaluate a mealkd checkpoint (it records its class names) or a validation tree with every training class"
        )
    size = image_size or (norm.size if norm else loaded.input_size)
    if size is None:
        raise UserError("--image-size: the checkpoint does not record its training size; pass --image-size")
    norm = Normalization(size=size, mean=tuple(loaded.mean), std=tuple(loaded.std))
    backend = resolve_backend(device)
    resolve_precision(precision, backend.device)  # a bad value is a one-line error before any work
    model = loaded.module.to(backend.device)
    ids = readable_images(index, backend, console=console)
    result = evaluate(model, index, class_names, norm, backend, batch_size=batch_size, per_class=per_class, ids=ids, precision=precision)
    result["unreadable"] = len(index) - len(ids)  # skipped files, not in the denominator
    return result
