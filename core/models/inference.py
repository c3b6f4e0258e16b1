"""Inference-only rewrites of a model that leave its function unchanged (teachers in stage one)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: largest softmax difference a rewrite may make on a random input (float32 rounding is ~1e-6)
FOLD_TOLERANCE = 1e-4


def fold_batchnorm(module: torch.nn.Module, input_size: int) -> tuple[torch.nn.Module, bool]:
    """(``module`` with every eval-mode BatchNorm that follows a convolution folded into it, True), or
    (``module`` unchanged, False) where that cannot be done or would change the outputs.

    A folded BatchNorm is one kernel fewer per layer: one pass less over each activation on a GPU;
    on a 2-core CPU 1.01-1.03x (ResNet-50/101) to 1.12x (MobileNetV3, EfficientNet-B0) per batch
    (benchmarks/teacher_fold.py, docs/benchmarks.md). PyTorch's FX pass does the folding
    (``torch.fx.experimental.optimization.fuse``); models FX cannot trace (TorchScript, exported
    programs, data-dependent control flow) are kept as they are. The folded model is checked against
    the original on a random batch, in float32 on the CPU, before it is used.
    """
    if isinstance(module, (torch.jit.ScriptModule, torch.fx.GraphModule)) or not _batchnorms(module):
        return module, False
    from torch.fx.experimental.optimization import fuse

    module.eval()
    try:
        folded = fuse(module)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: keep the model as it is
        log.debug("BatchNorm folding skipped for %s: %s", type(module).__name__, err)
        return module, False
    if _batchnorms(folded) >= _batchnorms(module):  # nothing matched (e.g. a BatchNorm subclass): keep the original
        return module, False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, input_size, input_size, generator=generator)
    with torch.inference_mode():
        try:
            diff = (torch.softmax(module(x).float(), 1) - torch.softmax(folded(x).float(), 1)).abs().max().item()
        except Exception as err:  # noqa: BLE001 - a traced graph that cannot run is not used
            log.debug("BatchNorm folding skipped for %s: the folded model failed: %s", type(module).__name__, err)
            return module, False
    if not diff <= FOLD_TOLERANCE:
        log.debug("BatchNorm folding skipped for %s: outputs moved by %.2e", type(module).__name__, diff)
        return module, False
    return folded, True


def _batchnorms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
