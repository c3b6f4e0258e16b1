"""Atomic checkpoints: write a temp file, fsync it, rename over the old one, fsync the directory."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from storage.errors import UserError

CHECKPOINT_FORMAT = "mealkd-checkpoint"


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                torch.save(obj, handle)
            except RuntimeError as err:  # torch's zip writer reports a short write (e.g. disk full) this way
                raise OSError(f"could not write {path}: {err}") from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, *, flag: str = "--checkpoint") -> dict:
    """A mealkd checkpoint dict; UserError if missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"{flag} {path}: cannot read it as a torch checkpoint ({type(err).__name__}); is the file complete?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{flag} {path}: not a mealkd checkpoint; pass a file written by `mealkd distill`")
    return ckpt
