"""Test-only fault injection (used by tests/test_reliability*.py; inert unless the variable is set).

``MEALKD_TEST_KILL_AT="point:n"`` makes this process SIGKILL itself the n-th time (1-based) it
reaches ``kill_point("point")``, so tests can kill a run at an exact, randomly chosen moment
(mid-shard, before ``done``, during finalisation, at a training step) instead of guessing timings.
``"point:n:SIGNAL"`` sends that signal instead (``TERM``, ``USR1``, ``INT``: what a cluster or a
terminal sends), and ``"point:n:SIGNAL:RANK"`` only in the process whose torchrun ``RANK`` is RANK.
"""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("MEALKD_TEST_KILL_AT", "")
_POINT, _N, _SIGNAL, _RANK = (_SPEC.split(":") + ["", "", "KILL", ""])[:4] if _SPEC else ("", "0", "KILL", "")
_seen = 0


def kill_point(name: str) -> None:
    global _seen
    if not _SPEC or name != _POINT or (_RANK and _RANK != os.environ.get("RANK", "0")):
        return
    _seen += 1
    if _seen == int(_N):
        os.kill(os.getpid(), getattr(signal, f"SIG{_SIGNAL or 'KILL'}"))
