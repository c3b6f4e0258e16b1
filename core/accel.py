"""The GPU compute policy both stages share: fp16 autocast and channels_last on CUDA, plain fp32 on CPU."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast_for(device: torch.device) -> AbstractContextManager:
    """fp16 autocast on CUDA; nothing on CPU (bf16 there would change results and rarely speeds up)."""
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """channels_last on CUDA (faster convolutions with autocast); unchanged on CPU."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images
