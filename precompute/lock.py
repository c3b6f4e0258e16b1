"""Writing a store safely: an advisory lock so two uncoordinated runs never write one store, and
one-line errors for a failed write (``writing_store``)."""
from __future__ import annotations

from contextlib import contextmanager

from mealkd.core.file_lock import FileLock
from mealkd.errors import UserError
from mealkd.storage import remote
from mealkd.storage.schema import is_local, local_path
from mealkd.storage.writer import remove_partial_files


class StoreLock(FileLock):
    """``<store>.lock`` beside the store, held for the whole run by rank 0. Remote (fsspec) stores get no lock."""

    def __init__(self, url: str):
        path = local_path(url) if is_local(url) else None  # the same path the store itself is opened at (~ expanded)
        lock = None if path is None else path.with_name(path.name + ".lock")
        super().__init__(
            lock,
            busy=lambda holder: (f"--out {path}: another mealkd process (pid {holder}: a precompute, extend, merge, "
                                 "import-fkd or verify --repair) is writing this store; wait for it to finish or choose another --out"),
            unwritable=lambda reason: f"--out {path.parent if path else url}: cannot write there ({reason}); choose a writable location",
        )
        self.url = url

    def __enter__(self) -> "StoreLock":
        super().__enter__()
        remove_partial_files(self.url)  # a killed writer's temp files: with the lock held, no write is in flight
        return self


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
