"""What a distill run tells its user: progress, RUN/metrics.jsonl, RUN/config.json, TensorBoard.

Progress is a rich bar when stderr is a terminal, and plain text lines every ``--log-every``
steps when it is not (SLURM/Kubernetes logs, ``| tee``), so a cluster log stays readable. The
running means are read from the device only when a line or the bar is refreshed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import TextColumn

from mealkd.core.progress import RateColumn, make_progress
from mealkd.core.timing import format_duration
from mealkd.distill.checkpoint import atomic_path
from mealkd.errors import UserError

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
TENSORBOARD_DIR = "tensorboard"
BAR_REFRESH_EVERY = 10  # steps between bar refreshes on a terminal
D_KEYS = ("d_loss", "d_acc")  # the discriminator's metrics: 0 in metrics.jsonl with --discriminator off (scripts read them)


def d_text(d_loss: float, d_acc: float) -> str:
    """The discriminator's part of a progress or epoch line."""
    return f"  D {d_loss:.3f} (acc {d_acc:.0%})"


class RunLog:
    """Rank 0's record of a run; every method is a no-op on other ranks (``enabled=False``)."""

    def __init__(self, run_dir: Path, console: Console, *, enabled: bool, log_every: int, tensorboard: bool,
                 discriminator: bool = True):
        self.run_dir = run_dir
        self.discriminator = discriminator  # False: --discriminator off, so lines and TensorBoard leave D's zeros out
        self.console = console
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.plain = not console.is_terminal
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard: the tensorboard package is not installed; pip install tensorboard (or mealkd[tensorboard])") from None
            self._writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    # -- files ----------------------------------------------------------------------------------
    def write_config(self, record: dict) -> None:
        """RUN/config.json: the run's full configuration and facts, rewritten at every (re)start."""
        if not self.enabled:
            return
        with atomic_path(self.run_dir / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")

    def trim(self, last_epoch: int) -> None:
        """Drop metric lines of epochs after ``last_epoch`` (from a run killed after logging them)."""
        path = self.run_dir / METRICS_NAME
        if not self.enabled or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if (epoch := _epoch_of(line)) is not None and epoch <= last_epoch]
        with atomic_path(path) as tmp:  # a kill during the rewrite keeps the old log, not half of it
            tmp.write_text("".join(line + "\n" for line in lines))

    def epoch_record(self, record: dict, global_step: int) -> None:
        """Append the epoch's metrics line (and TensorBoard scalars)."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_NAME, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch" and (self.discriminator or key not in D_KEYS):
                    self._writer.add_scalar(f"epoch/{key}", value, record["epoch"])
            self._writer.add_scalar("epoch/global_step", global_step, record["epoch"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- progress -------------------------------------------------------------------------------
    def wants_means(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (1-based) of ``steps`` shows the running means (so they are read then). The
        same on every rank (``plain`` is rank 0's, shared): the means shown are the job's, all-reduced there."""
        every = self.log_every if self.plain else BAR_REFRESH_EVERY
        return step % every == 0 or step == steps or (not self.plain and step == 1)

    def progress(self, epochs: int, batch_size: int):
        """A context manager whose ``epoch(e, steps, done=0)`` returns that epoch's step reporter
        (``done``: steps already done, for an epoch resumed where it stopped)."""
        return _PlainProgress(self, epochs) if self.plain else _BarProgress(self, epochs, batch_size)

    def scalars(self, means: dict, lr: float, global_step: int) -> None:
        if self._writer is not None:
            for key, value in means.items():
                if self.discriminator or key not in D_KEYS:
                    self._writer.add_scalar(f"step/{key}", value, global_step)
            self._writer.add_scalar("step/lr", lr, global_step)


class _BarProgress:
    def __init__(self, log: RunLog, epochs: int, batch_size: int):
        self.log, self.epochs, self.batch_size = log, epochs, batch_size
        columns = (
            RateColumn("crops", "crops_per_step"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            *([TextColumn("D {task.fields[d_loss]:.3f} ({task.fields[d_acc]:.0%})")] if log.discriminator else []),
            TextColumn("agree {task.fields[agree]:.1%}"),
        )
        self.progress = make_progress(log.console, *columns, enabled=log.enabled)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def epoch(self, epoch: int, steps: int, done: int = 0):
        task = self.progress.add_task(f"epoch {epoch + 1}/{self.epochs}", total=steps, completed=done, loss=0.0, d_loss=0.0, d_acc=0.0,
                                      agree=0.0, crops_per_step=self.batch_size)

        def step(done: int, crops: int, means: dict | None, lr: float) -> None:
            fields = {} if means is None else dict(loss=means["loss"], d_loss=means["d_loss"], d_acc=means["d_acc"], agree=means["agreement"])
            self.progress.update(task, advance=1, crops_per_step=crops, **fields)

        return step

    def print(self, text: str) -> None:
        if self.log.enabled:
            self.progress.console.print(text)


class _PlainProgress:
    def __init__(self, log: RunLog, epochs: int):
        self.log, self.epochs = log, epochs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def epoch(self, epoch: int, steps: int, done: int = 0):
        started = time.perf_counter()
        seen, first = 0, done

        def step(done: int, crops: int, means: dict | None, lr: float) -> None:
            nonlocal seen
            seen += crops
            if means is None or not self.log.enabled:
                return
            elapsed = max(time.perf_counter() - started, 1e-9)
            left = elapsed / max(1, done - first) * (steps - done)  # the steps of this epoch still to run, at this session's pace
            self.log.console.print(
                f"epoch {epoch + 1}/{self.epochs} step {done}/{steps}: loss {means['loss']:.4f}"
                + (d_text(means["d_loss"], means["d_acc"]) if self.log.discriminator else "")
                + f"  agree {means['agreement']:.1%}  lr {lr:.3g}  {seen / elapsed:.0f} crops/s  "
                f"epoch ends in {format_duration(left)}",
                soft_wrap=True, highlight=False,
            )

        return step

    def print(self, text: str) -> None:
        if self.log.enabled:
            self.log.console.print(text, soft_wrap=True, highlight=False)


def read_records(run_dir: Path) -> list[dict]:
    """The epoch records of RUN/metrics.jsonl, without blank or torn lines (a full disk or a kill during the
    append); [] if there is none."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _epoch_of(line) is not None]


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics line; None for a blank or torn one (a full disk or a kill during the append)."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None
