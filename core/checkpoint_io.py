"""The one ``torch.load`` policy of mealkd: every checkpoint, weights file and state dict it reads
goes through :func:`load_torch_file`.

Policy: ``torch.load(weights_only=True)`` on the CPU, so a file can only hold tensors, containers
and plain values (what state dicts, optimiser/scheduler states, RNG states and mealkd's own
checkpoints are made of) and loading it never runs code from the file. A file that needs full
unpickling (arbitrary Python objects) is refused with a one-line error naming the switch
``MEALKD_TRUST_CHECKPOINTS=1``; with it set, such a file is loaded with ``weights_only=False``
(after a warning): only for files you trust, since unpickling can run any code. A ``.safetensors``
file (what ``mealkd export --format safetensors`` writes) is read with safetensors, which holds tensors only.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from mealkd.errors import UserError, first_line

TRUST_ENV = "MEALKD_TRUST_CHECKPOINTS"  # =1: allow full unpickling of files weights_only refuses
#: the ``format`` of a checkpoint ``mealkd distill`` writes (a dict: model, optimiser, norm, class names, ...)
CHECKPOINT_FORMAT = "mealkd-checkpoint"
#: the ``format`` of the ``FILE.json`` record ``mealkd export`` writes beside an exported FILE
EXPORT_FORMAT = "mealkd-export"
log = logging.getLogger(__name__)


def sidecar_path(out: str | os.PathLike) -> Path:
    """``FILE.json`` beside an export ``FILE`` (the whole name plus '.json': model.onnx -> model.onnx.json)."""
    return Path(str(out) + ".json")


def export_record(path: str | os.PathLike) -> dict:
    """The record ``mealkd export`` wrote beside ``path`` (class names, input size, mean/std, student spec), or {}."""
    try:
        record = json.loads(sidecar_path(os.path.expanduser(path)).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("format") == EXPORT_FORMAT else {}


def trusted() -> bool:
    """Whether the user set ``MEALKD_TRUST_CHECKPOINTS=1``."""
    return os.environ.get(TRUST_ENV, "").strip() == "1"


def _first_line(err: BaseException) -> str:
    return first_line(err, 1000).split(". ")[0][:200]  # torch's messages go on for sentences


def _refusal(err: BaseException) -> str:
    """The useful part of torch's long weights_only message: 'Unsupported global: GLOBAL x.Y'."""
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\.\s|$)", str(err), re.M)
    return m.group(1).strip()[:200] if m else _first_line(err)


#: how files torch.save never writes begin, and what they are
_OTHER_FORMATS = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"\x08", "probably an ONNX model"),
                  (b"\x7fELF", "a program"), (b"{", "JSON text"))


def _not_torch(path: Path) -> str | None:
    """What ``path`` is when it cannot be a ``torch.save`` file (those are zip archives, or pickles in the
    legacy format), else None."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    if not head:
        return "it is empty"
    return next((f"it is {name}" for magic, name in _OTHER_FORMATS if head.startswith(magic)), "neither a zip archive nor a pickle")


def torch_archive(path: str | os.PathLike) -> str | None:
    """Which of torch's zip archives ``path`` is: 'torchscript' (``torch.jit.save``: the module's code and
    constants), 'pickle' (``torch.save``: a ``data.pkl``, no code), or None (neither, or not a zip)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return "torchscript"
    return "pickle" if any(name.endswith("/data.pkl") for name in names) else None


def _load_safetensors(path: Path, what: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"{what} {path}: a safetensors file needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{what} {path}: cannot read it as a safetensors file ({_first_line(err)}); is the file complete?") from None


def load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load`` of ``path`` onto the CPU under mealkd's policy (module docstring).

    ``what`` names the file in messages (e.g. ``"--checkpoint"``, ``"weights file"``): every
    failure is a one-line :class:`UserError` "``what`` ``path``: problem; fix".
    """
    import torch

    path = Path(path)
    if path.is_dir():  # a distill run's directory (or a label store) where its checkpoint was meant
        hint = f"pass its checkpoint, {path / 'checkpoint.pt'}" if (path / "checkpoint.pt").is_file() else "pass a file"
        raise UserError(f"{what} {path}: a directory, not a checkpoint or weights file; {hint}")
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found; check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, what)
    if torch_archive(path) == "torchscript":  # torch.load's refusal would say "Cannot use weights_only=True with TorchScript archives"
        raise UserError(f"{what} {path}: a TorchScript file, which is a whole model, not a state dict; give its path as the "
                        f"model spec itself (e.g. --teachers {path}), without an architecture")
    kind = _not_torch(path)
    if kind is not None:  # before torch.load, whose refusal would read as "holds Python objects ... trust it"
        raise UserError(f"{what} {path}: not a PyTorch file ({kind}); pass a checkpoint or weights file saved by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trusted():
            raise UserError(f"{what} {path}: holds Python objects that the safe loader (torch.load weights_only=True) "
                            f"refuses ({_refusal(err)}); if you trust the file, set {TRUST_ENV}=1") from None
        refused = err
    except Exception as err:  # noqa: BLE001 - corrupt zip, not a torch file, truncated, ...
        raise UserError(f"{what} {path}: cannot read it as a PyTorch file ({_first_line(err)}); "
                        "is the file complete (not truncated)?") from None
    log.warning("%s %s: loading with full unpickling (%s=1): %s", what, path, TRUST_ENV, _refusal(refused))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{what} {path}: cannot read it even with {TRUST_ENV}=1 ({_first_line(err)}); "
                        "is the file complete (not truncated)?") from None
