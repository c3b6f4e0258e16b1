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


def test_store_writers_stop_once_on_the_launchers_signal_burst_and_a_repeat_acts_at_once():
    """torchrun's agent passes Ctrl-C on as SIGINT and then SIGTERM within a millisecond: the store-writing
    commands stop once (StopRequested) and the echo is ignored (handing SIGTERM back to SIG_DFL while it
    was pending made CPython raise 'OSError: Signal 15 ignored due to race condition'); the same signal
    again acts as without the handler."""
    from mealkd.core.signals import stopping_on_signals
    from mealkd.errors import StopRequested

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with pytest.raises(KeyboardInterrupt):
        with stopping_on_signals("precompute"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                pytest.fail("no stop")
            except StopRequested as stop:
                assert stop.exit_code == 128 + signal.SIGINT and "stopped by SIGINT" in str(stop)
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's echo: ignored, the process lives on
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: at once
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
