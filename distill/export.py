"""`mealkd export`: a trained student -> a file that the standard tools load, numerically equal to it.

Formats (``--format``), each loaded without mealkd:

- ``state-dict``: ``torch.save`` of the plain state dict (``torch.load`` with ``weights_only=True`` and
  ``load_state_dict`` into the architecture, e.g. ``torchvision.models.get_model(ARCH, num_classes=N)``).
- ``safetensors``: the same tensors in a safetensors file (``safetensors.torch.load_file``); needs the
  ``safetensors`` package (``pip install 'mealkd[export]'``).
- ``onnx``: ``torch.onnx.export`` with a dynamic batch axis (input ``input``, output ``logits``), for
  ``onnxruntime``. A torchvision/timm/.pt2 student goes through the torch.export-based exporter
  (``dynamo=True``: needs ``onnx`` and ``onnxscript``, ``pip install 'mealkd[onnx]'``); a TorchScript
  student through torch's TorchScript-based exporter (``dynamo=False``: needs ``onnx``), the only one that
  takes a ScriptModule.
- ``pt2``: ``torch.export.export`` with a dynamic batch and the training size as H x W, saved with
  ``torch.export.save`` (``torch.export.load(FILE).module()``); mealkd takes it back as a ``FILE.pt2``
  model spec. A TorchScript student cannot be exported this way (torch.export takes no ScriptModule).

Every export writes ``FILE.json`` beside it: class names (in output order), input size, mean/std (the
normalisation the model expects, in [0, 1] pixel units), the student spec, the checkpoint's sha256 and
the check below. After writing, the file is loaded back with its standard tool and run on a fixed
random batch next to the checkpoint's model (CPU, float32): ``max_abs_diff`` is recorded; state-dict
and safetensors must be exactly equal, onnx and pt2 within :data:`TOLERANCE`. ONNX is checked with
``onnxruntime`` if it is installed, else with ``onnx.checker`` only (said in the result).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import torch

from mealkd.core.checkpoint_io import EXPORT_FORMAT, load_torch_file, sidecar_path
from mealkd.core.models import file_sha256
from mealkd.distill.checkpoint import atomic_path
from mealkd.distill.checkpoint_eval import load_student
from mealkd.distill.protocol import EvalProtocol
from mealkd.errors import UserError, first_line

FORMATS = ("state-dict", "safetensors", "onnx", "pt2")
TOLERANCE = 1e-5  # max |difference| of the logits of an onnx/pt2 export on the check batch (float32, CPU)
CHECK_BATCH = 3   # the check batch differs from the export's example batch (2): the batch axis is dynamic
_EXTRAS = {"safetensors": ("export", ("safetensors",)), "onnx": ("onnx", ("onnx", "onnxscript"))}


class ExportMismatch(RuntimeError):
    """The exported file, loaded back, does not compute what the checkpoint's model computes."""


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _require(fmt: str, modules: tuple[str, ...]) -> None:
    extra = _EXTRAS[fmt][0]
    missing = _missing(modules)
    if missing:
        raise UserError(f"--format {fmt} needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                        f"pip install 'mealkd[{extra}]' (or pip install {' '.join(missing)})")


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (no shared storage: safetensors refuses shared tensors)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _write_atomic(out: Path, write) -> None:
    """``write(tmp_path)``, then the file replaces ``out`` (:func:`~mealkd.distill.checkpoint.atomic_path`)."""
    with atomic_path(out) as tmp:
        write(tmp)


def _export_pt2(model, example: torch.Tensor, spec_text: str):
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(f"--format pt2: the student {spec_text} is a TorchScript module, which torch.export cannot take; "
                        "export --format state-dict or onnx, or train an architecture spec (torchvision:ARCH)")
    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # noqa: BLE001 - unsupported op, data-dependent control flow, ...
        raise UserError(f"--format pt2: torch.export cannot export {spec_text} ({first_line(err)}); "
                        "export --format state-dict instead") from None


def _write_onnx(model, example: torch.Tensor, path: Path, spec_text: str) -> str:
    """Write the ONNX file; returns which exporter was used."""
    scripted = isinstance(model, torch.jit.ScriptModule)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice, tracer warnings
            if scripted:
                torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            else:
                program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["input"],
                                            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
                program.save(str(path))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--format onnx: torch.onnx.export failed for {spec_text} ({first_line(err)}); "
                        "export --format state-dict or pt2 instead") from None
    return "torchscript" if scripted else "dynamo"


def _check(fmt: str, path: Path, model, batch: torch.Tensor) -> dict:
    """Load ``path`` with its standard tool, run it on ``batch``: {'max_abs_diff', 'checked_with'} (diff None
    when no runtime is installed)."""
    with torch.no_grad():
        want = model(batch)
        if fmt in ("state-dict", "safetensors"):
            if fmt == "state-dict":
                state = load_torch_file(path, "--out")  # torch.load with weights_only=True: mealkd's one loader
                tool = "torch.load + load_state_dict"
            else:
                from safetensors.torch import load_file

                state = load_file(str(path))
                tool = "safetensors.torch.load_file + load_state_dict"
            twin = copy.deepcopy(model)
            twin.load_state_dict(state, strict=True)
            got = twin(batch)
        elif fmt == "pt2":
            got = torch.export.load(str(path)).module()(batch)
            tool = "torch.export.load"
        else:
            import onnx

            onnx.checker.check_model(str(path))
            if importlib.util.find_spec("onnxruntime") is None:
                return {"max_abs_diff": None, "checked_with": "onnx.checker (onnxruntime not installed: outputs not compared)"}
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
            tool = "onnx.checker + onnxruntime"
    return {"max_abs_diff": float((got.float() - want.float()).abs().max()), "checked_with": tool}


def export_checkpoint(checkpoint: str, fmt: str, out: str, *, student: str | None = None,
                      image_size: int | None = None, weights: str = "auto") -> dict:
    """Export the student of ``checkpoint`` (a mealkd checkpoint, or a state dict with ``student``) as
    ``fmt`` to ``out`` and its sidecar ``out.json``; returns the sidecar's record. UserError (one line)
    on an unknown format, a missing file or package, or a model the exporter cannot take."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown export format; use one of {', '.join(FORMATS)}")
    if fmt in _EXTRAS:  # before any work; onnxscript is checked once the student is known (TorchScript needs none)
        _require(fmt, _EXTRAS[fmt][1][:1])
    out_path = Path(out).expanduser()
    if out_path.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name, e.g. {out_path / ('model' + {'state-dict': '.pth'}.get(fmt, '.' + fmt))}")
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size {image_size}: must be a positive number of pixels")
    loaded, class_names, norm = load_student(checkpoint, student=student, flag="CHECKPOINT", weights=weights)
    size = image_size or (norm.size if norm else None) or loaded.input_size
    if size is None:
        raise UserError(f"CHECKPOINT {checkpoint}: records no input size (a plain state dict); pass --image-size")
    mean, std = (norm.mean, norm.std) if norm else (loaded.mean, loaded.std)  # what it was trained with, as recorded
    model = loaded.module.cpu().float().eval()
    spec_text = loaded.spec.text
    if fmt == "onnx" and not isinstance(model, torch.jit.ScriptModule):
        _require(fmt, _EXTRAS[fmt][1])  # the torch.export-based exporter needs onnxscript too
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=generator)
    check_batch = torch.randn(CHECK_BATCH, 3, size, size, generator=generator)
    with torch.no_grad():
        if not torch.isfinite(model(check_batch)).all():  # else the export's own check reports "differs by nan" against itself
            raise UserError(f"CHECKPOINT {checkpoint}: the model's outputs are not finite (NaN or inf) on a random batch: its weights "
                            "are broken, e.g. by a run that diverged; export another checkpoint")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    exporter = None
    if fmt == "state-dict":
        state = _plain_state_dict(model)
        _write_atomic(out_path, lambda tmp: torch.save(state, tmp))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt", "mealkd_student_spec": spec_text, "class_names": json.dumps(class_names),
                "input_size": str(size), "mean": json.dumps(list(mean)), "std": json.dumps(list(std))}
        state = _plain_state_dict(model)
        _write_atomic(out_path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    elif fmt == "pt2":
        program = _export_pt2(model, example, spec_text)
        _write_atomic(out_path, lambda tmp: torch.export.save(program, str(tmp)))
    else:  # written in place: a model over 2 GB gets its weights in a side file named after the .onnx file
        try:
            exporter = _write_onnx(model, example, out_path, spec_text)
        except BaseException:
            out_path.unlink(missing_ok=True)
            raise

    check = _check(fmt, out_path, model, check_batch)
    protocol = EvalProtocol()  # what `mealkd evaluate` feeds it by default, for a downstream user's own transform
    record = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "export_format": fmt,
        "file": out_path.name,
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "checkpoint_sha256": file_sha256(str(Path(checkpoint).expanduser())),
        "student_spec": spec_text,
        "weights": loaded.weights_kind,
        "source": loaded.spec.source,
        "arch": loaded.spec.arch,
        "num_classes": int(loaded.num_classes),
        "class_names": class_names,
        "input_size": int(size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "eval_transform": {"resize_shorter": protocol.resize_for(int(size)), "interpolation": protocol.interpolation,
                           "antialias": True, "center_crop": int(size)},
        "torch_version": torch.__version__,
        "check": {**check, "batch": CHECK_BATCH, "tolerance": 0.0 if fmt in ("state-dict", "safetensors") else TOLERANCE},
    }
    if getattr(model, "transform_input", None) is not None:  # googlenet / inception_v3: they re-normalise their input inside
        record["transform_input"] = bool(model.transform_input)
    if fmt == "onnx":
        record["onnx"] = {"input": "input", "output": "logits", "dynamic_axes": {"input": [0], "logits": [0]}, "exporter": exporter}
    if fmt == "pt2":
        record["pt2"] = {"dynamic_axes": [0], "example_input_shape": [2, 3, size, size]}
    sidecar = sidecar_path(out_path)
    _write_atomic(sidecar, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    diff, tolerance = check["max_abs_diff"], record["check"]["tolerance"]
    if diff is not None and not diff <= tolerance:
        raise ExportMismatch(f"the {fmt} export {out_path} differs from the checkpoint's model by {diff:.3g} on a "
                           f"{CHECK_BATCH}-image batch (tolerance {tolerance:g}); the file is left there for inspection")
    return record
