"""Label row encodings: dense fp16 and top-k (indices + fp16 values), their decoders and fidelity.

Top-k decode (as FKD / TinyViT): the k stored values at their indices, and the leftover mass
``1 - sum(values)`` spread evenly over the other ``C - k`` classes. If fp16 rounding makes the k
values sum to more than 1, the leftover is 0 and the k values are rescaled to sum to 1.
"""
from __future__ import annotations

import sys

import numpy as np


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 (IEEE round-to-nearest-even). numpy's cast is ~5x slower than torch's on
    softmax rows, most of whose values are fp16 subnormals; use torch when it is already imported
    (identical bits, checked in the tests), never import it just for this."""
    torch = sys.modules.get("torch")
    if torch is not None and x.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float16).numpy()
    return x.astype(np.float16)


def to_f32(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact); torch if already imported (faster on subnormals)."""
    torch = sys.modules.get("torch")
    if torch is not None and x.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).numpy()
    return x.astype(np.float32)


def encode_topk(probs: np.ndarray, k: int, index_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(..., C) float -> (idx (..., k) index_dtype, val (..., k) float16), by decreasing value."""
    c = probs.shape[-1]
    part = np.argpartition(probs, c - k, axis=-1)[..., c - k:]
    vals = np.take_along_axis(probs, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(part, order, axis=-1)
    vals = np.take_along_axis(vals, order, axis=-1)
    return idx.astype(index_dtype), to_f16(np.ascontiguousarray(vals, dtype=np.float32))


def decode_topk(idx: np.ndarray, val: np.ndarray, num_classes: int) -> np.ndarray:
    """(..., k) indices + values -> (..., C) float32 rows summing to 1."""
    k = idx.shape[-1]
    v = to_f32(val)
    s = v.sum(axis=-1, keepdims=True)
    rest = np.maximum(np.float32(1.0) - s, np.float32(0.0)) / np.float32(max(1, num_classes - k))
    out = np.empty(idx.shape[:-1] + (num_classes,), dtype=np.float32)
    out[...] = rest
    np.put_along_axis(out, idx.astype(np.intp), v, axis=-1)
    over = s[..., 0] > 1.0
    if np.any(over):
        out[over] /= s[over]
    return out


def normalise_rows(rows: np.ndarray) -> np.ndarray:
    """fp16/float rows -> float32 rows summing to 1 (all-zero rows, i.e. never written, stay 0)."""
    out = to_f32(rows) if rows.dtype == np.float16 else rows.astype(np.float32)
    s = out.sum(axis=-1, keepdims=True)
    np.divide(out, s, out=out, where=s > 0)
    return out


def topk_tv(probs: np.ndarray, idx: np.ndarray, val: np.ndarray, block: int = 64) -> tuple[float, float, int]:
    """Total-variation distance between dense rows and their decoded top-k rows.

    Returns (sum of TV over rows, max TV, number of rows); works in blocks of ``block`` images so
    memory stays bounded for a whole shard.
    """
    c = probs.shape[-1]
    total, worst, rows = 0.0, 0.0, 0
    for s in range(0, probs.shape[0], block):
        p = probs[s:s + block].astype(np.float32)
        d = decode_topk(idx[s:s + block], val[s:s + block], c)
        tv = 0.5 * np.abs(p - d).sum(axis=-1)
        total += float(tv.sum(dtype=np.float64))
        worst = max(worst, float(tv.max(initial=0.0)))
        rows += tv.size
    return total, worst, rows
