"""Test-only fault injection (used by tests/test_reliability*.py; inert unless the variable is set).

``MEALKD_TEST_KILL_AT="point:n"`` makes this process SIGKILL itself the n-th time (1-based) it
reaches ``kill_point("point")``, so tests can kill a run at an exact, randomly chosen moment
(mid-shard, before ``done``, during finalisation, at a training step) instead of guessing timings.
"""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("MEALKD_TEST_KILL_AT", "")
_POINT, _, _N = _SPEC.rpartition(":")
_seen = 0


def kill_point(name: str) -> None:
    global _seen
    if not _SPEC or name != _POINT:
        return
    _seen += 1
    if _seen == int(_N):
        os.kill(os.getpid(), signal.SIGKILL)
