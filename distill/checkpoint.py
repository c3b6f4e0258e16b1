"""Atomic files (checkpoints, exports, a run's logs): write a temp file, fsync it, rename over the old one, fsync the directory."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mealkd.core.checkpoint_io import CHECKPOINT_FORMAT, load_torch_file
from mealkd.errors import UserError



def share_as_umask_allows(path: str | Path) -> None:
    """Give ``path`` the permissions a plainly created file gets (0666 less the umask). ``mkstemp`` (and
    safetensors) create files for their owner only, so a checkpoint or export was unreadable by the
    teammates and evaluation jobs of a shared cluster, while ``torch.save`` to a path is not."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, which would briefly
    change it for every other thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path (same folder, same suffix, so writers that look at it behave) whose file replaces ``path``
    only when the block completes: fsync, rename over ``path``, fsync of the folder, the umask's permissions.
    On any error the temp file is removed and ``path`` is untouched. The one way distill writes a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        share_as_umask_allows(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose bytes replace ``path`` only when the block completes (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` all or nothing."""
    with _atomic_file(path) as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as err:  # torch's zip writer reports a short write (e.g. disk full) this way
            raise OSError(f"could not write {path}: {err}") from None


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
    """Copy a finished file to ``dst`` (best.pt, epoch snapshots) all or nothing."""
    with _atomic_file(dst) as out, open(src, "rb") as source:
        shutil.copyfileobj(source, out, 1 << 20)
