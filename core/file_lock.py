"""An advisory lock on a file (``fcntl.flock``), held by one process for a whole run, that names its holder's
pid to whoever is refused. The lock file stays behind: removing it while another process waits on it would
let a third take a second lock on a new file."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from mealkd.errors import UserError


class FileLock:
    """``busy(pid)``: the refusal when another process holds ``path``; ``unwritable(reason)``: when the lock
    file cannot be created there."""

    def __init__(self, path: Path | None, busy: Callable[[str], str], unwritable: Callable[[str], str]):
        self.path = path
        self._busy, self._unwritable = busy, unwritable
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(self._unwritable(err.strerror or str(err))) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise UserError(self._busy(holder)) from None
        except OSError as err:  # e.g. ENOLCK: a network file system without a lock service
            os.close(self._fd)
            self._fd = None
            raise UserError(self._unwritable(f"cannot lock a file there: {err.strerror or err}")) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
