"""torch.distributed glue: under ``torchrun`` join the process group; alone, behave as rank 0 of 1.

One collective policy for both stages:

* **tensors** (DDP gradients, epoch metrics, D's gradients) live on the training device and use the
  default group: NCCL for CUDA tensors, gloo for CPU tensors (``"cpu:gloo,cuda:nccl"`` on GPU, so a
  CPU tensor never reaches NCCL, which has no CPU backend), with ``STEP_TIMEOUT``;
* **Python objects and barriers** (dataset sizes, the pending-shard list, "everyone is here") go
  through a separate CPU gloo group with ``WAIT_TIMEOUT``: a rank may wait there for hours while the
  others label their shards, which must not trip the per-step timeout.

The device is decided once, by the caller (``core.dali_io.resolve_backend``: ``LOCAL_RANK`` modulo
the visible device count, which also works when a launcher shows each process one GPU), and passed
here; nothing in this module picks a GPU itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from mealkd.errors import UserError

#: a collective on tensors that takes longer than this is a hang (a training step, an all-reduce)
STEP_TIMEOUT = timedelta(minutes=30)
#: object collectives and barriers: ranks may wait here while the others finish their shards / epoch
WAIT_TIMEOUT = timedelta(hours=float(os.environ.get("MEALKD_WAIT_TIMEOUT_HOURS", "12")))


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 when run alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_rank() -> int:
    """This process's global rank as torchrun set it (``RANK``; 0 when run alone), readable before the
    process group is formed or after it is gone (e.g. to print a command's summary once)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The job's number of processes as torchrun set it (``WORLD_SIZE``; 1 when run alone), readable before the
    process group is formed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher of its kind) set the rendezvous environment, even for 1 process:
    then the process group is formed, so a 1-process run exercises the same collectives as 8."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_group_backend(device: torch.device) -> str:
    """The default group's backend string: gloo for CPU tensors always, NCCL for CUDA tensors."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cpu_group: Any = None  # the gloo group for objects and barriers (None when alone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """In a process group (launched by torchrun, even with one process): collectives run."""
        return self.cpu_group is not None

    def barrier(self) -> None:
        """Wait for every rank (on the CPU group; names the missing ranks if one never arrives)."""
        if self.active:
            dist.monitored_barrier(group=self.cpu_group, timeout=WAIT_TIMEOUT, wait_all_ranks=True)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Send a picklable object from ``src`` to every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    def on_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0 only, its result sent to every rank (e.g. one dataset scan per job
        instead of one per rank). A UserError on rank 0 is raised on every rank, so no rank is left
        waiting for a result that never comes; rank 0 prints it, the others only exit (``echoed``)."""
        if not self.active:
            return compute()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", compute())
            except UserError as err:
                outcome = ("error", str(err))
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise UserError(value, echoed=not self.is_main)
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, on every rank, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes, for training/inference on ``device``."""
    if not launched_by_torchrun():
        return Dist()
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(backend=default_group_backend(device), timeout=STEP_TIMEOUT, **kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank(), cpu_group=cpu_group)


#: what a collective's error says when the rank at the other end went away (raised and exited, was killed, lost its host)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "[gloo]", "NCCL", "ProcessGroup", "watchdog")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of a multi-process job ended:
    the survivors then see gloo/NCCL errors that say nothing of why, and the useful line is the other
    rank's, printed above. ``cli.main`` turns these into one line."""
    if env_world_size() < 2:
        return False
    return isinstance(err, dist.DistError) or (isinstance(err, (RuntimeError, OSError)) and any(k in str(err) for k in _PEER_GONE))


def seed_for(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of ``rank`` in ``epoch``: different per rank (independent dropout masks), a pure
    function of (seed, rank, epoch), so a resumed epoch draws exactly what the original did."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
