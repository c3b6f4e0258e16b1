"""Stopping a training run on request, at a step every rank agrees on, so nothing is lost.

Clusters end jobs with a signal and a grace period: SLURM sends SIGTERM (or, with
``--signal=USR1@SECONDS``, SIGUSR1 ahead of the time limit) and SIGKILLs about 30 s later;
Kubernetes and torchrun's agent send SIGTERM; a terminal sends SIGINT (Ctrl-C). Without handling,
each of these ends the process like SIGKILL: the run resumes from its last epoch checkpoint and
repeats up to an epoch of work. :class:`GracefulStop` turns the first of these signals into a
request: the trainer finishes the step it is in, writes a checkpoint of that exact point of the
epoch, and exits, and ``--resume`` continues from that step. A second signal acts as it would
without us (SIGTERM/SIGUSR1 end the process, SIGINT raises KeyboardInterrupt), so a stuck run can
still be stopped at once.

The same agreement carries "save now" for ``--checkpoint-minutes``: rank 0's clock says when a
checkpoint inside an epoch is due (a crash, an OOM kill or a lost node then costs at most that much
work, not a whole epoch), and every rank must take part in that save at the same step.

Under torchrun every rank must stop after the same step, or the ranks that go on would wait in
DDP's all-reduce for ranks that left. A signal reaches each rank at a slightly different moment, so
the ranks agree: after every step each rank starts an asynchronous all-reduce (MAX, on the CPU gloo
group: no GPU sync) of (the stop signal it received, whether a save is due), and reads the result
one step later. All ranks therefore read the same values after the same step. The cost is one small
CPU collective per step, overlapped with the next step (``benchmarks/stop_agreement.py``: about
0.2 ms per step with 2 ranks on a 2-core CPU; nothing alone).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as torch_dist

from mealkd.core.distributed import Dist
from mealkd.core.signals import STOP_SIGNALS


class StepDecision(NamedTuple):
    """What every rank does after a step: stop (save, then end the process) and/or save a checkpoint."""

    stop: bool
    save: bool


class GracefulStop:
    """A context manager that records the first stop signal instead of dying of it (main thread only;
    elsewhere the signals keep their default action), and tells every rank when to stop or save.
    ``save_due``: rank 0's answer to "is a checkpoint due?" (the other ranks' answers are ignored)."""

    def __init__(self, dist: Dist, save_due: Callable[[], bool] = lambda: False):
        self.dist = dist
        self.save_due = save_due
        self.signum: int | None = None  # this rank's first stop signal
        self.agreed_signum: int | None = None  # the signal every rank agreed to stop on
        self._previous: dict[int, Any] = {}
        # (stop signal, save due): one buffer, written and read through numpy, reused once the previous
        # all-reduce on it is done (a new tensor per step cost ~50 us of the ~180 us a step's agreement took)
        self._flag_np = np.zeros(2, dtype=np.int64)
        self._flag = torch.from_numpy(self._flag_np)
        self._pending: Any = None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._wait_pending()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once, as if we were not here

    def after_step(self) -> StepDecision:
        """What every rank does after the step just done. Alone: stop if a signal came, save if one is
        due. Under torchrun: the same for the requests of one step ago (the same answer on every rank)."""
        if not self.dist.active:
            self._agree(self.signum)
            return StepDecision(self.agreed_signum is not None, self.save_due())
        signum, save = self._wait_pending()
        self._agree(signum)
        if self.agreed_signum is None:  # every rank decides alike, so every rank starts the next agreement or none does
            due = self.dist.is_main and self.save_due() and not save  # a save just agreed resets rank 0's clock first
            self._flag_np[:] = (self.signum or 0, int(due))
            self._pending = torch_dist.all_reduce(self._flag, op=torch_dist.ReduceOp.MAX, group=self.dist.cpu_group, async_op=True)
        return StepDecision(self.agreed_signum is not None, save)

    def at_epoch_end(self) -> bool:
        """Whether every rank stops now, before the next epoch (one synchronous agreement; a save due
        now is dropped: the epoch's own checkpoint was just written)."""
        self._wait_pending()
        if not self.dist.active:
            self._agree(self.signum)
        else:
            flag = torch.tensor([self.signum or 0], dtype=torch.int64)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self.dist.cpu_group)
            self._agree(int(flag.item()) or None)
        return self.agreed_signum is not None

    def _wait_pending(self) -> tuple[int | None, bool]:
        """The agreement started after the previous step: (a rank's stop signal or None, a save is due)."""
        if self._pending is None:
            return None, False
        self._pending.wait()
        self._pending = None
        signum, save = (int(v) for v in self._flag_np)
        return signum or None, bool(save)

    def _agree(self, signum: int | None) -> None:
        if signum and self.agreed_signum is None:
            self.agreed_signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.agreed_signum).name if self.agreed_signum else ""
