"""The signals that ask a long command to stop, and the store-writing commands' answer to them.

SIGTERM is what SLURM, Kubernetes and torchrun's agent send (then SIGKILL about 30 s later);
SIGUSR1 is what SLURM sends ahead of a time limit with ``--signal=USR1@SECONDS``; SIGINT is Ctrl-C.
``distill`` turns them into a stop after the current step (``distill.preemption``). The commands that
write label stores stop at once instead (:func:`stopping_on_signals`): their work is kept shard by
shard, a shard is marked done only after its data is on disk, and a shard write already under way is
finished first. So the signal costs at most the shard being labelled.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from mealkd.core.distributed import env_rank
from mealkd.errors import StopRequested

#: the signals that ask a run to stop (SIGINT: Ctrl-C; SIGTERM: SLURM, Kubernetes, torchrun; SIGUSR1: SLURM --signal)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stopping_on_signals(command: str) -> Iterator[None]:
    """Within the block a stop signal raises StopRequested in the main thread (one line naming the signal
    and how to continue, on rank 0 only; exit 128 + signal), so ``finally`` blocks and context managers
    run (a shard write in flight completes, then the process ends). Outside the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    is_main = env_rank() == 0

    def stop(signum: int, frame: FrameType | None) -> None:
        def again(second: int, frame: FrameType | None) -> None:
            """The same signal again acts at once (as without this handler); another one is the launcher
            passing the same request on (torchrun's agent sends SIGINT, then SIGTERM, within a millisecond)
            and is ignored, so the stop already under way finishes. Handing another signal back to SIG_DFL
            while it was pending made CPython raise 'OSError: Signal 15 ignored due to race condition'."""
            if second == signum:
                for s in STOP_SIGNALS:
                    signal.signal(s, previous[s])
                signal.raise_signal(signum)

        for s in STOP_SIGNALS:
            signal.signal(s, again)
        # the stop may come before the store exists (while the images are validated): say nothing of its state
        message = (f"{command}: stopped by {signal.Signals(signum).name}; shards already finished are kept: rerun the same "
                   "command to continue") if is_main else ""
        raise StopRequested(message, signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
