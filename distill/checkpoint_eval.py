"""Load a trained student from a checkpoint and evaluate it."""
from __future__ import annotations

import os

from mealkd.core.checkpoint_io import export_record, load_torch_file
from mealkd.core.accel import apply_numerics, resolve_precision
from mealkd.core.dali_io import resolve_backend
from mealkd.core.dataset import scan_image_folder
from mealkd.core.models import FILE_SOURCES, load_model, parse_spec
from mealkd.core.models.spec import rest_is_pt2
from mealkd.core.replay import Normalization
from mealkd.distill.checkpoint import is_checkpoint
from mealkd.distill.evaluate import EvalProtocol, evaluate, readable_images
from mealkd.errors import UserError


WEIGHTS = ("auto", "raw", "ema")


def _record_norm(record: dict) -> Normalization | None:
    if not record.get("input_size"):
        return None
    return Normalization(size=int(record["input_size"]), mean=tuple(record["mean"]), std=tuple(record["std"]))


def _load_exported_program(checkpoint: str, weights: str, flag: str):
    """``mealkd export --format pt2``'s file is a whole model: evaluated as it is, with its sidecar's classes and sizes."""
    record = export_record(checkpoint)
    loaded = load_model(parse_spec(checkpoint), init="weights")
    loaded.weights_kind = record.get("weights", "raw")
    if weights == "ema" and loaded.weights_kind != "ema":
        raise UserError(f"--weights ema: {flag} {checkpoint} holds the {loaded.weights_kind} weights it was exported with; "
                        "export the checkpoint with --weights ema to evaluate those")
    return loaded, record.get("class_names"), _record_norm(record)


def ema_weights(raw: object) -> dict | None:
    """The EMA weights of a loaded distill checkpoint (a run with --ema-decay), else None."""
    return raw.get("ema") if is_checkpoint(raw) else None


def init_from_ema(loaded, init: str, choice: str) -> str:
    """``distill --init FILE --init-weights choice``: load ``init``'s EMA weights into ``loaded`` (built with
    its raw weights) when ``choice`` asks for them ('auto': when the file has them); returns which
    weights the student starts from, 'raw' or 'ema'."""
    if choice == "raw":  # what load_model loaded: the file is not read a second time
        return "raw"
    ema = ema_weights(load_torch_file(init, "--init"))
    if choice == "ema" and ema is None:
        raise UserError(f"--init-weights ema: --init {init} holds no EMA weights (its run had no --ema-decay); use --init-weights raw")
    if ema is None:
        return "raw"
    loaded.module.load_state_dict(ema)
    return "ema"


def load_student(checkpoint: str, *, student: str | None = None, num_classes: int | None = None, flag: str = "--checkpoint",
                 weights: str = "auto"):
    """(LoadedModel, class names or None, training Normalization or None) from a checkpoint file.

    ``weights``: 'raw' (the trained weights), 'ema' (the EMA of a run with --ema-decay) or 'auto' (EMA
    when the checkpoint has it); ``LoadedModel.weights_kind`` says which were loaded.

    The architecture comes from ``student`` or the checkpoint's own student spec; for a TorchScript
    (.pt) or ExportedProgram (.pt2) student that is its file, into which the checkpoint's state dict is
    loaded. ``flag`` names the checkpoint in error messages."""
    if student is None and rest_is_pt2(checkpoint):
        return _load_exported_program(checkpoint, weights, flag)
    raw = load_torch_file(checkpoint, flag)
    is_ours = is_checkpoint(raw)
    record = {} if is_ours else export_record(checkpoint)  # a state dict from `mealkd export` says what it is beside it
    spec_text = student or (raw.get("student_spec") if is_ours else record.get("student_spec"))
    if spec_text is None:
        raise UserError(f"{flag} {checkpoint}: a plain state dict needs --student ARCH spec (e.g. torchvision:resnet18)")
    spec = parse_spec(spec_text)
    if student is None and spec.source in FILE_SOURCES and not os.path.isfile(os.path.expanduser(spec.weights_file or "")):
        kind, suffix = ("TorchScript", ".pt") if spec.source == "torchscript" else ("ExportedProgram", ".pt2")
        raise UserError(f"{flag} {checkpoint}: its student is the {kind} file {spec.weights_file}, which is not there "
                        f"(moved, or a relative path from another directory); pass it with --student PATH{suffix}")
    loaded = load_model(spec, num_classes=raw["num_classes"] if is_ours else num_classes, init=checkpoint)  # None: read from the file
    ema = ema_weights(raw)
    if weights == "ema" and ema is None:
        raise UserError(f"--weights ema: {checkpoint} holds no EMA weights (the run had no --ema-decay); use --weights raw")
    loaded.weights_kind = "ema" if ema is not None and weights in ("auto", "ema") else "raw"
    if loaded.weights_kind == "ema":
        loaded.module.load_state_dict(ema)
    if not is_ours and record:
        loaded.weights_kind = record.get("weights", loaded.weights_kind)
    norm = Normalization(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["norm"].items()}) if is_ours else _record_norm(record)
    class_names = raw.get("class_names") if is_ours else record.get("class_names")
    return loaded, class_names, norm


def evaluate_checkpoint(data: str, checkpoint: str, *, student: str | None = None, image_size: int | None = None,
                        batch_size: int = 64, device: str = "auto", per_class: bool = False, console=None,
                        class_names: list[str] | None = None, precision: str = "auto",
                        protocol: EvalProtocol = EvalProtocol(), weights: str = "auto", num_threads: int | None = None) -> dict:
    """Evaluate a checkpoint on ``data`` under ``protocol`` (crop size: ``image_size``, else the checkpoint's
    training size). Class names come from a mealkd checkpoint, else ``class_names`` (the training classes,
    in training order), else the validation tree's own classes. The result records the protocol used."""
    index = scan_image_folder(data)
    loaded, ckpt_names, norm = load_student(checkpoint, student=student, weights=weights)
    class_names = ckpt_names or loaded.class_names or class_names or index.class_names
    if len(class_names) != loaded.num_classes:
        raise UserError(
            f"--checkpoint {checkpoint}: the model has {loaded.num_classes} classes but {data} has {len(class_names)}; "
            "evaluate a mealkd checkpoint (it records its class names) or a validation tree with every training class"
        )
    size = image_size or (norm.size if norm else loaded.input_size)
    if size is None:
        raise UserError("--image-size: the checkpoint does not record its training size; pass --image-size")
    if loaded.size_fixed and size != loaded.input_size:
        raise UserError(f"--image-size {size}: {checkpoint} takes {loaded.input_size}x{loaded.input_size} images only (exported at a "
                        "fixed size); drop --image-size")
    own = loaded.spec.mean is not None or loaded.spec.std is not None  # --student's :mean=/:std= outrank what the file records
    norm = Normalization(size=size, mean=tuple(loaded.mean if own or not norm else norm.mean),
                         std=tuple(loaded.std if own or not norm else norm.std))
    protocol.check(size)
    backend = resolve_backend(device)
    # a bad value is a one-line error before any work; fp32 on a GPU means no TF32 either (the policy of core.accel),
    # and every batch but the last has one shape, so cuDNN may pick its fastest kernels
    apply_numerics(backend.device, resolve_precision(precision, backend.device), fixed_shapes=True)
    model = loaded.module.to(backend.device)
    ids = readable_images(index, backend, console=console, num_threads=num_threads)
    result = evaluate(model, index, class_names, norm, backend, batch_size=batch_size, per_class=per_class, ids=ids, precision=precision,
                      protocol=protocol, num_threads=num_threads)
    if result["nonfinite"]:
        fp16 = " (or its fp16 arithmetic overflows: try --precision fp32)" if resolve_precision(precision, backend.device) == "fp16" else ""
        raise UserError(f"--checkpoint {checkpoint}: the model's outputs are not finite (NaN or inf) on {result['nonfinite']} of "
                        f"{result['images']} images: its weights are broken, e.g. by a run that diverged{fp16}; evaluate another checkpoint")
    result["unreadable"] = len(index) - len(ids)  # skipped files, not in the denominator
    result["protocol"] = protocol.describe(size)
    result["weights"] = loaded.weights_kind
    return result
