"""Writing a store safely: an advisory lock so two uncoordinated runs never write one store, and
one-line errors for a failed write (``writing_store``)."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from mealkd.errors import UserError
from mealkd.storage import remote
from mealkd.storage.schema import is_local, local_path


class StoreLock:
    """``fcntl.flock`` on ``<store>.lock`` beside the store, held for the whole run by rank 0.
    Remote (fsspec) stores get no lock."""

    def __init__(self, url: str):
        path = local_path(url) if is_local(url) else None  # the same path the store itself is opened at (~ expanded)
        self.path: Path | None = None if path is None else path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "StoreLock":
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"--out {self.path.parent}: cannot write there ({err.strerror}); choose a writable location") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise UserError(
                f"--out {self.path.with_suffix('')}: another mealkd process (pid {holder}: a precompute, extend, merge, "
                "import-fkd or verify --repair) is writing this store; wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def writing_store(out: str, what: str = "the label store"):
    """A failed store write (disk full, quota, read-only, I/O error; on a remote store: the endpoint gone,
    access denied) is a one-line user error; what was written before stays valid because ``done`` is only
    set after a shard's data is on disk."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not is_local(out) and (isinstance(err, OSError) or remote.is_transport_error(err)):
            raise UserError(f"{remote.translate(out, err, doing='write')}; rerun the same command once it is fixed "
                            "(finished shards are kept)") from None
        if not isinstance(err, OSError):
            raise
        raise UserError(
            f"--out {out}: writing {what} failed ({err.strerror or err}); free space or choose "
            "another location, then rerun the same command to continue (finished shards are kept)"
        ) from None
