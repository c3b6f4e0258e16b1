"""Validate a dataset with the DALI decoder and measure every image's decoded (H, W).

DALI fails a whole batch on one corrupt file, good samples included, so a failed batch is retried
file by file in fresh pipelines to name the culprits. Sizes come from ``fn.peek_image_shape``
(EXIF-aware, the decoder's orientation rule) and are cross-checked against the decoded shape.

The decoder (nvImageCodec) logs a corrupt file on the C-level stderr (``[ERROR] [jpeg_parser]
Invalid marker``), beside mealkd's own message. While probing, file descriptor 2 is routed to a
temp file (:func:`decoder_log`): the decoder's lines become the per-file ``reasons`` that mealkd
folds into its one-line message, and everything else written there meanwhile (Python warnings,
progress bars) is written back to the real stderr.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from mealkd.core.dali_io import Backend, build_pipeline, run_batches
from mealkd.core.dataset import DatasetIndex
from mealkd.core.replay import probe_graph
from mealkd.errors import UserError

ProgressFn = Callable[[int], None]
log = logging.getLogger(__name__)

_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
# nvImageCodec / DALI log lines: "[ERROR] [jpeg_parser] Invalid marker" (level, then a [module] tag)
_DECODER_LINE = re.compile(r"^\s*\[(?:FATAL|ERROR|WARNING|WARN|INFO|DEBUG|TRACE|VERBOSE)\]\s*\[[\w.:-]+\]")
# nvimgcodecStatus_t values (nvimgcodec.h) that DALI reports as "nvImageCodec failure: '#N'"
_NVIMGCODEC_STATUS = {3: "bad code stream", 4: "not a supported image format", 13: "bad code stream",
                      14: "not a supported image format", 19: "incomplete bit stream"}


@contextmanager
def decoder_log() -> Iterator[list[str]]:
    """Route file descriptor 2 to a temp file for the block; yield a list that, on exit, holds the
    decoder's log lines (ANSI colours stripped). Every other byte written to fd 2 meanwhile is
    written back to the real stderr, and fd 2 is restored even if the block raises."""
    lines: list[str] = []
    _flush_python_stderr()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            try:
                _flush_python_stderr()  # what Python buffered meanwhile belongs to the window
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            other = _split_decoder_lines(sink.read(), lines)
            if other:
                os.write(2, other)


def _flush_python_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def _split_decoder_lines(data: bytes, decoder_lines: list[str]) -> bytes:
    """Append decoder log lines of ``data`` to ``decoder_lines``; return the rest, byte for byte."""
    other = []
    for raw in data.splitlines(keepends=True):
        text = _ANSI.sub(b"", raw).decode(errors="replace").strip()
        if _DECODER_LINE.match(text):
            decoder_lines.append(text)
        else:
            other.append(raw)
    return b"".join(other)


def decoder_reason(lines: list[str], error: BaseException | None = None) -> str:
    """A short reason for a file the decoder refused: its first ERROR line ("jpeg_parser: Invalid
    marker"), else nvImageCodec's status from DALI's exception, else "cannot be decoded"."""
    for line in sorted(lines, key=lambda s: "[ERROR]" not in s and "[FATAL]" not in s):
        m = re.match(r"^\s*\[\w+\]\s*\[([\w.:-]+)\]\s*(.*)$", line)
        if m:
            return f"{m.group(1)}: {m.group(2).strip()}"[:200]
    m = re.search(r"nvImageCodec failure: '#(\d+)'", str(error or ""))
    if m:
        return _NVIMGCODEC_STATUS.get(int(m.group(1)), f"nvImageCodec status {m.group(1)}")
    return "cannot be decoded"


def _probe_pipeline(backend: Backend, batch_size: int, num_threads: int | None):
    """Synchronous: a batch holding a corrupt file is expected here, and DALI's asynchronous executor
    can crash the process on one (see :func:`build_pipeline`)."""
    return build_pipeline(probe_graph(backend.decoder), batch_size=batch_size, backend=backend, num_threads=num_threads,
                          synchronous=True)


def _probe_batch(index: DatasetIndex, ids: list[int], pipe) -> np.ndarray:
    feed = {"encoded": [index.read_bytes(i) for i in ids]}
    ((peeked, decoded),) = list(run_batches(pipe, [feed], lambda outs: (np.array(outs[0].as_array()), np.array(outs[1].as_array()))))
    peeked = peeked.reshape(len(ids), -1)[:, :2]
    decoded = decoded.reshape(len(ids), -1)[:, :2]
    if not np.array_equal(peeked, decoded):
        bad = [index.paths[i] for i, p, d in zip(ids, peeked, decoded) if not np.array_equal(p, d)]
        raise RuntimeError(f"header and decoded sizes differ for {bad[:3]}")
    return decoded.astype(np.int32)


def _probe_one(index: DatasetIndex, i: int, pipe) -> tuple[np.ndarray | None, str]:
    """(H, W) of one file through a batch-1 pipeline, or (None, why the decoder refused it).

    The caller reuses the pipeline for the good files of a failed batch: one new GPU pipeline per
    file (a decoder and CUDA streams each) made validating a 193-file tree with one corrupt file
    take 2 minutes on an H100 (benchmarks/gpu_check.py, 2026-11-26)."""
    with decoder_log() as lines:
        try:
            return _probe_batch(index, [i], pipe)[0], ""
        except OSError as err:  # the file itself cannot be read (gone, no permission): the OS says why
            return None, (err.strerror or type(err).__name__).lower()
        except RuntimeError as err:
            error = err
    return None, decoder_reason(lines, error)


def probe_images(
    index: DatasetIndex,
    ids: np.ndarray,
    backend: Backend,
    *,
    batch_size: int = 64,
    num_threads: int | None = None,
    progress: ProgressFn | None = None,
    reasons: dict[int, str] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Decode every image in ``ids``; return sizes (len(ids), 2) = (H, W) and the ids that failed.

    Failed images get size (0, 0). Zero-byte files fail without reaching DALI. If ``reasons`` is
    given, it receives id -> why each failed image was refused (the decoder's own message).
    """
    sizes = np.zeros((len(ids), 2), dtype=np.int32)
    bad: list[int] = []
    why: dict[int, str] = {} if reasons is None else reasons
    position = {int(i): row for row, i in enumerate(ids)}
    id_list = [int(i) for i in ids]
    pipe = None  # one pipeline for all clean batches (building and tearing one down per batch cost ~2/3 of the probe)
    for start in range(0, len(id_list), batch_size):
        chunk = id_list[start : start + batch_size]
        good = [i for i in chunk if index.byte_sizes[i] > 0]
        for i in chunk:
            if index.byte_sizes[i] == 0:
                bad.append(i)
                why[i] = "empty file"
        try:
            with decoder_log() as lines:  # a clean batch's decoder warnings are dropped; a failed one is retried below
                if good and pipe is None:
                    pipe = _probe_pipeline(backend, batch_size, num_threads)
                measured = _probe_batch(index, good, pipe) if good else np.zeros((0, 2), np.int32)
            if lines:
                log.debug("decoder messages for a clean batch: %s", lines[:3])
            for i, hw in zip(good, measured):
                sizes[position[i]] = hw
        except (RuntimeError, OSError):
            pipe = None  # a failed run may leave the pipeline unusable: the next clean batch gets a new one
            single = None  # one batch-1 pipeline for the file-by-file retry, rebuilt only after a file fails
            for i in good:
                if single is None:
                    single = _probe_pipeline(backend, 1, 1)
                hw, reason = _probe_one(index, i, single)
                if hw is None:
                    bad.append(i)
                    why[i] = reason
                    single = None
                else:
                    sizes[position[i]] = hw
        if progress is not None:
            progress(len(chunk))
    return sizes, sorted(bad)


def recheck_failed_batch(index: DatasetIndex, ids, backend: Backend) -> tuple[list[int], list[int], dict[int, str]]:
    """After a DALI batch failed in the middle of a run (the files decoded when they were validated):
    (the files among ``ids`` that can no longer be read: removed, moved, unreadable; those that no longer
    decode: rewritten in place; id -> reason)."""
    reasons: dict[int, str] = {}
    _, bad = probe_images(index, np.unique(np.asarray(list(ids), dtype=np.int64)), backend, num_threads=1, reasons=reasons)
    gone = [i for i in bad if not os.access(index.root / index.paths[i], os.R_OK)]
    return gone, [i for i in bad if i not in gone], reasons


def failed_batch_error(index: DatasetIndex, ids, backend: Backend, err: RuntimeError, *, rerun: str, why_unseen: str = "") -> Exception:
    """After a DALI batch of a run failed: a UserError naming the files among ``ids`` (the batches in flight)
    that can no longer be read, or no longer decode though every one did when the label store was made,
    with ``rerun`` (how to continue); else ``err`` itself. ``why_unseen``: why the command's own checks
    at its start could not see the change."""
    gone, bad, reasons = recheck_failed_batch(index, ids, backend)
    if gone:
        return UserError(f"--data: {describe_unreadable(index, gone, reasons)} can no longer be read (removed, moved or made "
                         f"unreadable during the run); restore it and {rerun}")
    if bad:
        return UserError(f"--data: {describe_unreadable(index, bad, reasons)} no longer decode(s), though every stored image did when "
                         f"the label store was made (changed in place{why_unseen}); restore it and {rerun}")
    return err


def describe_unreadable(index: DatasetIndex, bad: list[int], reasons: dict[int, str], limit: int = 3) -> str:
    """'PATH (reason), PATH (reason) and N more' for a one-line message."""
    named = ", ".join(f"{index.root / index.paths[i]}" + (f" ({reasons[i]})" if reasons.get(i) else "") for i in bad[:limit])
    return named + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def refuse_nothing_to_train_on(index: DatasetIndex, excluded: np.ndarray, bad: list[int], reasons: dict[int, str], *,
                               none_usable: str = "can be decoded", unusable: str = "unreadable",
                               fix_all: str = "point --data at a folder of readable images",
                               fix_class: str = "fix those files or remove the class directory") -> None:
    """--skip-bad may leave out some images, not all, nor all of a class: such a store would be 'complete'
    and verify, yet hold nothing (or nothing of that class) for a student to learn from. ``bad``: the
    excluded image ids, ``reasons`` why (both named in the message); the wording defaults to
    precompute's (undecodable images), import-fkd passes its own (images or their label files)."""
    if excluded.all():
        raise UserError(f"--data {index.root}: none of its {len(index)} image file(s) {none_usable}, e.g. "
                        f"{describe_unreadable(index, bad, reasons, limit=1)}; --skip-bad would leave nothing to train on: {fix_all}")
    readable = np.bincount(index.targets[~excluded], minlength=len(index.class_names))
    empty = np.flatnonzero(readable == 0)
    if len(empty):
        lost = [i for i in bad if index.targets[i] == empty[0]]
        raise UserError(f"--data {index.root}: every image of class '{index.class_names[empty[0]]}' is {unusable}, e.g. "
                        f"{describe_unreadable(index, lost, reasons, limit=1)}"
                        + (f" (and of {len(empty) - 1} more class(es))" if len(empty) > 1 else "")
                        + f"; --skip-bad would leave the class with nothing to train on: {fix_class}")
