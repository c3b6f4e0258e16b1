"""Atomic checkpoints: write a temp file, fsync it, rename over the old one, fsync the directory."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mealkd.core.checkpoint_io import load_torch_file
from mealkd.errors import UserError

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


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a mealkd checkpoint dict (as written by ``mealkd distill``)."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | Path, *, flag: str = "--checkpoint") -> dict:
    """A mealkd checkpoint dict, read under the one torch.load policy (``core.checkpoint_io``:
    weights_only=True; it holds only tensors and plain values); UserError if missing or not ours."""
    ckpt = load_torch_file(path, flag)
    if not is_checkpoint(ckpt):
        raise UserError(f"{flag} {path}: not a mealkd checkpoint; pass a file written by `mealkd distill`")
    return ckpt


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a finished file to ``dst`` (best.pt, epoch snapshots) all or nothing: temp file, fsync, rename."""
    import shutil

    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
