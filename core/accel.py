"""The compute policy both stages share: ``--precision`` (autocast dtype), channels_last on CUDA and
``--compile``.

``--precision auto|fp32|fp16|bf16``:

* ``auto``: on CUDA, bf16 autocast where the GPU supports it (Ampere and newer: no loss scaling
  needed, no fp16 overflow), else fp16 autocast with a GradScaler; on CPU, plain fp32.
* ``fp32``: no autocast anywhere, and on CUDA no TF32 either (torch lets cuDNN convolutions use
  TF32 by default, a 10-bit mantissa): fp32 means fp32, e.g. to compare a GPU run with a CPU run.
* ``fp16`` / ``bf16``: autocast to that dtype on the chosen device (on CPU too, where torch
  supports it; slower than fp32 on most CPUs, useful to check a recipe).

Losses, the discriminator and the ensemble average are always computed in float32.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from mealkd.errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(flag: str, device: torch.device, *, option: str = "--precision") -> str:
    """``auto|fp32|fp16|bf16`` -> the concrete precision ('fp32', 'fp16' or 'bf16') on ``device``."""
    if flag not in PRECISIONS:
        raise UserError(f"{option} {flag}: choose one of {', '.join(PRECISIONS)}")
    if flag != "auto":
        return flag
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a concrete precision (None: fp32, no autocast)."""
    return _DTYPES[precision]


def autocast_for(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """The autocast context for ``precision`` ('auto' resolved here) on ``device``."""
    dtype = autocast_dtype(resolve_precision(precision, device))
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def apply_numerics(device: torch.device, precision: str, *, deterministic: bool = False, fixed_shapes: bool = False) -> None:
    """Process-wide kernel policy for a run on ``device`` at a concrete ``precision``.

    * fp32 on CUDA: TF32 off for matmuls and cuDNN convolutions.
    * ``deterministic``: deterministic algorithms (a warning, not an error, for an op that has no
      deterministic kernel), cuDNN autotuning off, and cuBLAS's fixed workspace (set before its
      first use). Two runs with the same flags on the same GPU and software then compute the same
      numbers, which is what makes a resumed run equal an uninterrupted one on a GPU.
    * otherwise ``fixed_shapes`` turns on cuDNN autotuning (every training batch has one size).
    """
    if device.type != "cuda":
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        return
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif fixed_shapes:
        torch.backends.cudnn.benchmark = True


@contextmanager
def numerics_restored() -> Iterator[None]:
    """Put back every process-wide flag :func:`apply_numerics` may set when the block ends (for a check
    or a test that applies a policy inside a process that goes on with its own)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def needs_grad_scaler(device: torch.device, precision: str) -> bool:
    """Loss scaling is needed for fp16 on CUDA only (bf16 has fp32's exponent range)."""
    return device.type == "cuda" and resolve_precision(precision, device) == "fp16"


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """channels_last on CUDA (faster convolutions with autocast); unchanged on CPU."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


#: ``--compile-backend`` values the help names (any backend ``torch.compiler.list_backends`` knows is accepted)
COMPILE_BACKENDS_SHOWN = ("inductor", "aot_eager", "cudagraphs", "eager")


def compiled(module: torch.nn.Module, backend: str, *, what: str, instead: str) -> torch.nn.Module:
    """``module`` through ``torch.compile`` with ``backend``, one compiled graph per batch shape
    (``dynamic=False``: every batch but an epoch's or a shard's last has one shape, and kernels for
    that shape are faster than shape-generic ones). A one-line UserError for a TorchScript module
    (``what`` names it, ``instead`` says what to do) or a backend torch does not know, before any work."""
    inner = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    if isinstance(inner, torch.jit.ScriptModule):
        raise UserError(f"--compile: {what} is a TorchScript file, which torch.compile cannot compile; {instead}")
    if backend not in torch.compiler.list_backends(exclude_tags=()):
        raise UserError(f"--compile-backend {backend}: not a torch.compile backend here; use one of {', '.join(COMPILE_BACKENDS_SHOWN)}")
    return torch.compile(module, backend=backend, dynamic=False)
