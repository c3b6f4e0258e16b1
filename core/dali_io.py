"""Small glue around DALI: device choice, pipeline construction, a prefetching runner, torch conversion."""
from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nvidia.dali.backend import TensorListGPU
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from mealkd.core.distributed import local_rank as distributed_local_rank
from mealkd.errors import UserError

Feed = dict[str, Any]  # external-source name -> batch (list of arrays, or an array with a leading batch axis)


@dataclass(frozen=True)
class Backend:
    """Where tensors live: torch device plus what DALI needs to match it."""

    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dali_device_id(self) -> int | None:
        return (self.device.index or 0) if self.is_cuda else None

    @property
    def decoder(self) -> str:
        """DALI decoder placement: 'mixed' (nvJPEG) on GPU, 'cpu' otherwise."""
        return "mixed" if self.is_cuda else "cpu"


def resolve_backend(flag: str, *, local_rank: int | None = None) -> Backend:
    """``--device auto|cpu|cuda`` -> Backend; auto picks CUDA when available.

    The one place a GPU is chosen: ``local_rank`` (default: torchrun's LOCAL_RANK) modulo the number
    of visible devices, so 8 ranks on an 8-GPU node get GPUs 0-7 and a launcher that shows each
    process only its own GPU (SLURM, Kubernetes) gets device 0 in every process.
    """
    if flag not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {flag}: choose auto, cpu or cuda")
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if flag == "cpu" or (flag == "auto" and not torch.cuda.is_available()):
        return Backend(torch.device("cpu"))
    rank = distributed_local_rank() if local_rank is None else local_rank
    return Backend(torch.device("cuda", rank % torch.cuda.device_count()))


def decoder_record(backend: Backend, hw_load: float | None = None) -> dict:
    """What decides the decoded pixels, for the store's ``decoder`` attribute: the DALI backend and
    version and, on GPU, the pinned hardware-decoder load (``hw_load``, default
    ``core.replay.HW_DECODER_LOAD``), the GPU model and the decoder libraries."""
    import nvidia.dali
    from nvidia.dali import backend as dali_backend

    from mealkd.core.replay import HW_DECODER_LOAD

    record: dict[str, Any] = {"backend": backend.decoder, "dali_version": nvidia.dali.__version__}
    if backend.is_cuda:
        record["hw_decoder_load"] = HW_DECODER_LOAD if hw_load is None else float(hw_load)
        record["gpu"] = torch.cuda.get_device_name(backend.device)
        # (DALI 2 decodes through nvImageCodec and no longer links nvJPEG: asking for its version only logs that)
        for key, getter in (("nvimgcodec", "GetNvimgcodecVersion"), ("cuda", "GetCudaVersion")):
            try:
                record[key] = getattr(dali_backend, getter)()
            except Exception:  # noqa: BLE001 - a library DALI cannot report is recorded as unknown
                record[key] = None
    return record


#: fields older records hold that are no longer recorded (DALI 2 does not link nvJPEG): not compared
RETIRED_DECODER_FIELDS = frozenset({"nvjpeg"})


def decoder_differences(stored: dict | None, current: dict) -> list[str]:
    """Fields of two decoder records that differ, 'backend' first ([] when they agree)."""
    stored = stored or {}
    keys = ["backend"] + sorted((set(stored) | set(current)) - {"backend"} - RETIRED_DECODER_FIELDS)
    return [k for k in keys if stored.get(k) != current.get(k)]


#: DALI CPU threads of a pipeline on the CPU backend when none are asked for: the cores are the model's
CPU_THREADS = 2
#: at most this many automatic DALI CPU threads per process on a GPU
MAX_AUTO_THREADS = 16
#: cores left to a GPU process's own Python threads (the one launching the model's kernels, the feed builder)
PYTHON_THREADS = 2


def auto_threads(backend: Backend) -> int:
    """DALI CPU threads for a pipeline when ``--num-threads`` is ``auto``.

    On a GPU, DALI's threads do the CPU share of decoding (nvJPEG's Huffman stage, file reads), which
    must keep up with the model: see :func:`auto_thread_count`. On the CPU the cores are the teachers'
    or the student's: :data:`CPU_THREADS`."""
    if not backend.is_cuda:
        return CPU_THREADS
    import os

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return auto_thread_count(usable, os.cpu_count() or usable, int(os.environ.get("LOCAL_WORLD_SIZE") or 1), cgroup_cpu_limit())


def auto_thread_count(usable: int, machine: int, local_processes: int, quota: float | None = None) -> int:
    """A GPU process's automatic DALI threads: its share of the cores, less :data:`PYTHON_THREADS` for its
    own Python threads, from 1 to :data:`MAX_AUTO_THREADS`. A process bound to a subset of the
    ``machine``'s cores (SLURM, ``taskset``: ``usable`` of them) owns that subset; an unbound one shares
    the machine with the other ``local_processes`` of its node (torchrun's ``LOCAL_WORLD_SIZE``). A
    container's CPU ``quota`` (a Kubernetes CPU limit, which the affinity mask does not show) is shared
    by those processes too."""
    local = max(1, local_processes)
    share = usable if usable < machine else usable // local
    if quota is not None:
        share = min(share, int(quota) // local)
    return max(1, min(MAX_AUTO_THREADS, share - PYTHON_THREADS))


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this container's cgroup quota allows (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), or None where there is no quota or it cannot be read."""
    from pathlib import Path

    try:
        v2 = Path(root, "cpu.max")
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = Path(root, "cpu", "cpu.cfs_quota_us"), Path(root, "cpu", "cpu.cfs_period_us")
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def dali_threads(num_threads: int | None, backend: Backend) -> int:
    """The DALI CPU threads a pipeline gets for ``--num-threads`` (None: auto)."""
    return auto_threads(backend) if num_threads is None else max(1, int(num_threads))


def build_pipeline(graph: Callable[[], Any], *, batch_size: int, backend: Backend, num_threads: int | None, seed: int = 0,
                   synchronous: bool = False) -> Pipeline:
    """Build a DALI pipeline from a graph function (outputs tuple) for the backend, with ``num_threads``
    DALI CPU threads (None: :func:`auto_threads`).

    ``synchronous``: DALI's executor runs each batch on the calling thread (its operators still use
    ``num_threads``), for pipelines whose batches are expected to fail (validation of untrusted
    files). With the asynchronous executor, DALI 2.4 crashed the process (SIGSEGV in
    ``share_outputs``) within a few batches that held a corrupt JPEG among larger good ones;
    synchronous, none crashed in ~1000 such batches (2026-11-26; test
    ``test_validating_a_corrupt_file_never_crashes_the_process``)."""
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=dali_threads(num_threads, backend),
        device_id=backend.dali_device_id,
        seed=seed,
        prefetch_queue_depth=1,  # run_batches keeps one batch in flight itself (see there)
        exec_async=not synchronous,
        exec_pipelined=not synchronous,
    )
    with pipe:
        outputs = graph()
        pipe.set_outputs(*(outputs if isinstance(outputs, (tuple, list)) else (outputs,)))
    pipe.build()
    return pipe


_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream per GPU for copies out of DALI's buffers (see :func:`_from_dali`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return _COPY_STREAMS[index]


def _from_dali(tensors: list[Any], device: torch.device) -> list[torch.Tensor]:
    """Copy DALI GPU tensors into new torch tensors, finished when this returns.

    The copies run on a side stream that is then synchronised: DALI may overwrite its buffer as soon
    as the caller releases it, so the copy must be done by then, and the side stream holds nothing
    else, so this waits for the copies alone, not for the model work queued on torch's stream (a
    synchronise of torch's stream here stalled stage one's teachers once per batch). Each tensor is
    marked as used by torch's current stream, so the caching allocator does not hand its memory back
    to the side stream while kernels queued there still read it."""
    stream = _copy_stream(device)
    current = torch.cuda.current_stream(device)
    outs = []
    with torch.cuda.stream(stream):
        for t in tensors:
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
            feed_ndarray(t, out, cuda_stream=stream)
            outs.append(out)
    stream.synchronize()
    for out in outs:
        out.record_stream(current)
    return outs


def to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    """Copy a uniform-shaped DALI TensorList into a new torch tensor on ``device``."""
    dense = tensor_list.as_tensor()
    if isinstance(tensor_list, TensorListGPU):
        return _from_dali([dense], device)[0]
    host = torch.from_numpy(np.array(dense))
    if device.type == "cuda":  # pinned memory: the copy runs asynchronously on the current stream
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def background(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    For the feeds of a pipeline: file reads and label decoding for the next batches then overlap the
    training step. An exception in the producer is re-raised in the consumer; a consumer that stops
    early (break, error) stops the producer too.
    """
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((err, None))

    thread = threading.Thread(target=produce, name="feeds", daemon=True)
    thread.start()
    try:
        while True:
            err, item = slots.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def batch_failed(err: RuntimeError) -> bool:
    """Whether ``err`` is DALI's error for a batch its operators could not process (a file that cannot be
    read or decoded, ...), as opposed to any other error raised while running a pipeline."""
    return "Critical error in pipeline" in str(err)


def run_batches(pipe: Pipeline, feeds: Iterable[Feed], convert: Callable[[tuple], Any], *, ahead: bool = True) -> Iterator[Any]:
    """Feed each batch to the pipeline's external sources and yield ``convert(outputs)``.

    One batch is scheduled ahead, so DALI decodes batch t+1 while the caller computes on batch t.
    The pipeline's queue depth is 1 and every scheduled run has its data fed first, so a pipeline
    can be reused for any number of epochs and a partial last batch is fine. ``convert`` must copy
    what it keeps: the buffer is released right after it. ``ahead=False`` runs the next batch only
    when the caller asks for it: on a CPU-only machine DALI's threads and torch's then do not
    fight over the same cores.
    """
    feed_iter = iter(feeds)
    fed: collections.deque = collections.deque()  # feeds of scheduled runs: alive until their outputs are taken (no_copy sources)

    def schedule_next() -> bool:
        feed = next(feed_iter, None)
        if feed is None:
            return False
        for name, data in feed.items():
            pipe.feed_input(name, data)
        pipe.schedule_run()
        fed.append(feed)
        return True

    in_flight = schedule_next()
    try:
        while in_flight:
            converted = convert(pipe.share_outputs())
            pipe.release_outputs()  # free the single buffer so the next batch runs while the caller works
            fed.popleft()
            if ahead:
                in_flight = schedule_next()
                yield converted
            else:
                yield converted
                in_flight = schedule_next()
    finally:
        _drain(pipe, fed)


def _drain(pipe: Pipeline, fed: collections.deque) -> None:
    """Take and drop the outputs of runs scheduled but never consumed (the caller stopped early: ``break``,
    an error, ``next(iter(...))``), so the pipeline's next loop starts with its own first batch, not this
    loop's leftover."""
    while fed:
        try:
            pipe.share_outputs()
            pipe.release_outputs()
        except (RuntimeError, StopIteration):  # the loop ended on a failed batch: DALI has nothing left to hand out
            return
        fed.popleft()


def to_samples(tensor_list: Any, device: torch.device) -> list[Any]:
    """Per-sample copies of a (possibly ragged) TensorList: numpy arrays on CPU, torch CUDA tensors on GPU."""
    if isinstance(tensor_list, TensorListGPU):
        # finished copies (see _from_dali): they are fed to another DALI pipeline, which does not know torch's streams
        return _from_dali([tensor_list[i] for i in range(len(tensor_list))], device)
    return [np.array(tensor_list[i]) for i in range(len(tensor_list))]
