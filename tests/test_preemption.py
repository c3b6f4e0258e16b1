"""distill.preemption.GracefulStop in this process: the first stop signal becomes a request, a second
one acts as it would without the handler, and leaving the block restores the previous handlers."""
from __future__ import annotations

import os
import signal

import pytest

from mealkd.core.distributed import Dist
from mealkd.core.signals import STOP_SIGNALS
from mealkd.distill.preemption import GracefulStop


def test_first_signal_is_a_request_and_a_second_ctrl_c_interrupts():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with GracefulStop(Dist()) as stop:
        assert stop.after_step() == (False, False)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a request
        assert stop.after_step() == (True, False) and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_usr1_is_a_request_and_the_request_holds_at_epoch_end():
    with GracefulStop(Dist()) as stop:
        assert not stop.at_epoch_end()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.at_epoch_end() and stop.agreed_signum == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # a second one ends the process


def test_a_due_save_is_asked_for_after_the_step():
    due = [False, True, False]
    with GracefulStop(Dist(), save_due=lambda: due.pop(0)) as stop:
        assert [stop.after_step() for _ in range(3)] == [(False, False), (False, True), (False, False)]
