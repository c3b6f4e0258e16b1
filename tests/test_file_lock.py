"""core.file_lock.FileLock: the one flock of a store (precompute's STORE.lock) and a distill run (RUN/.lock)."""
from __future__ import annotations

import errno
import fcntl
import os

import pytest

from mealkd.core.file_lock import FileLock
from mealkd.errors import UserError


def _lock(path):
    return FileLock(path, busy=lambda pid: f"busy: pid {pid}", unwritable=lambda reason: f"unwritable: {reason}")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_held_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    path = tmp_path / "run" / ".lock"
    with _lock(path):
        before = _open_fds()
        with pytest.raises(UserError, match=f"^busy: pid {os.getpid()}$"):
            _lock(path).__enter__()  # flock locks belong to an open file: a second open in this process is refused too
        assert _open_fds() == before
    with _lock(path):  # released on exit
        pass


def test_a_file_system_without_locks_is_one_line_and_leaks_no_descriptor(tmp_path, monkeypatch):
    """flock failing for another reason than 'held' (ENOLCK: NFS without a lock service) was a traceback
    that left the lock file open."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = _open_fds()
    with pytest.raises(UserError, match="^unwritable: cannot lock a file there: No locks available$"):
        _lock(tmp_path / ".lock").__enter__()
    assert _open_fds() == before
