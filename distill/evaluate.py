"""Top-1/top-5 on a validation ImageFolder with DALI, under an :class:`EvalProtocol`: resize the shorter
side to ``--resize-size`` (else round(S / ``--crop-pct``), 0.875 by default) with ``--interpolation``,
centre-crop S (the training size unless ``--image-size``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as torch_dist
from rich.markup import escape

from mealkd.core.accel import as_model_input, autocast_for
from mealkd.core.dali_io import Backend, background, build_pipeline, run_batches, to_torch
from mealkd.core.dataset import DatasetIndex
from mealkd.core.distributed import Dist
from mealkd.core.replay import FILES, Normalization, eval_graph
from mealkd.core.probe import describe_unreadable, probe_images
from mealkd.distill.protocol import EvalProtocol  # noqa: F401 - re-exported: evaluate(..., protocol=EvalProtocol())
from mealkd.errors import UserError


def class_mapping(val_classes: list[str], model_classes: list[str], *, flag: str = "--data") -> np.ndarray:
    """For each validation class, the model's class index (by name)."""
    position = {name: i for i, name in enumerate(model_classes)}
    missing = [name for name in val_classes if name not in position]
    if missing:
        raise UserError(
            f"{flag}: validation class '{missing[0]}' is not among the model's {len(model_classes)} classes; "
            "use a validation tree with the training class names"
        )
    return np.array([position[name] for name in val_classes], dtype=np.int64)


def readable_images(index: DatasetIndex, backend: Backend, *, flag: str = "--data", console=None, num_threads: int | None = None) -> np.ndarray:
    """Ids of the images the DALI decoder can read; unreadable ones are reported on ``console`` and
    left out (of the accuracy's denominator too). UserError if none is readable."""
    ids = np.arange(len(index))
    reasons: dict[int, str] = {}
    _, bad = probe_images(index, ids, backend, reasons=reasons, num_threads=num_threads)
    if len(bad) == len(index):
        raise UserError(f"{flag} {index.root}: none of its {len(index)} image file(s) can be decoded, e.g. "
                        f"{describe_unreadable(index, bad, reasons, limit=1)}; point {flag} at a folder of readable images")
    if bad and console is not None:
        console.print(f"[yellow]{flag}: skipping {len(bad)} unreadable image(s) (not counted in the accuracy), e.g. "
                      f"{escape(describe_unreadable(index, bad, reasons, limit=1))}", soft_wrap=True)
    return np.setdiff1d(ids, np.asarray(bad, dtype=np.int64))


def evaluate(
    model: torch.nn.Module,
    index: DatasetIndex,
    model_classes: list[str],
    norm: Normalization,
    backend: Backend,
    **kwargs,
) -> dict:
    """Accuracy of ``model`` on ``index`` (or its images ``ids``): top1, top5 (fractions), images, optional
    per-class top-1. Keyword arguments as :func:`evaluate_models`."""
    return evaluate_models({"": model}, index, model_classes, norm, backend, **kwargs)[""]


@torch.inference_mode()
def evaluate_models(
    models: dict[str, torch.nn.Module],
    index: DatasetIndex,
    model_classes: list[str],
    norm: Normalization,
    backend: Backend,
    *,
    batch_size: int = 64,
    num_threads: int | None = None,
    per_class: bool = False,
    ids: np.ndarray | None = None,
    flag: str = "--data",
    dist: Dist = Dist(),
    precision: str = "auto",
    protocol: EvalProtocol = EvalProtocol(),
) -> dict[str, dict]:
    """Accuracy of each of ``models`` (name -> module, e.g. the raw and the EMA weights) on the same
    images, decoded once: {name: {top1, top5, images[, per_class_top1]}}.

    Under torchrun every rank evaluates every world_size-th image (no padding, so nothing is counted
    twice) and the counts are summed over ranks: every rank returns the same, exact result.
    ``protocol``: resize/crop/interpolation of the images (:class:`EvalProtocol`; its default is 0.875, bilinear).
    """
    protocol.check(norm.size)
    mapping = class_mapping(index.class_names, model_classes, flag=flag)
    ids = np.arange(len(index)) if ids is None else np.asarray(ids)
    if len(ids) == 0:
        raise UserError(f"{flag} {index.root}: no images to evaluate; point {flag} at a folder of readable images")
    n = len(ids)
    ids = ids[dist.rank :: dist.world_size]
    targets = mapping[index.targets[ids]]
    pipe = build_pipeline(eval_graph(norm, backend.decoder, protocol.crop_pct, resize_size=protocol.resize_size,
                                     interpolation=protocol.interpolation), batch_size=batch_size, backend=backend, num_threads=num_threads)
    feeds = (
        {
            FILES: index.file_feed(ids[s : s + batch_size].tolist()),
            "target": [np.array(t, dtype=np.int64) for t in targets[s : s + batch_size]],
        }
        for s in range(0, len(ids), batch_size)
    )
    for model in models.values():
        model.eval()
    classes = len(model_classes)
    # per model, counts stay on the device (no host sync per batch): top-1 and top-5 hits, then per-class hits and totals,
    # then the images whose outputs are not finite (a diverged model's argmax is one class: a plausible chance-level score)
    counts = torch.zeros(len(models), 3 + 2 * classes, dtype=torch.int64, device=backend.device)
    convert = lambda outs: (to_torch(outs[0], backend.device), to_torch(outs[1], backend.device))  # noqa: E731
    for images, labels in run_batches(pipe, background(feeds), convert):
        inputs = as_model_input(images)
        for row, model in enumerate(models.values()):
            with autocast_for(backend.device, precision):
                logits = model(inputs).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit1 = top[:, 0] == labels
            counts[row, 0] += hit1.sum()
            counts[row, 1] += (top == labels[:, None]).any(dim=1).sum()
            counts[row, 2 : 2 + classes] += torch.bincount(labels[hit1], minlength=classes)
            counts[row, 2 + classes : 2 + 2 * classes] += torch.bincount(labels, minlength=classes)
            counts[row, -1] += (~torch.isfinite(logits).all(dim=1)).sum()
    if dist.active:
        torch_dist.all_reduce(counts)
    counts = counts.cpu().numpy()
    results = {}
    for row, name in enumerate(models):
        c = counts[row]
        result = {"top1": int(c[0]) / n, "top5": int(c[1]) / n, "images": n, "nonfinite": int(c[-1])}
        if per_class:
            hits, totals = c[2 : 2 + classes], c[2 + classes : 2 + 2 * classes]
            result["per_class_top1"] = {model_classes[k]: float(hits[k] / totals[k]) for k in range(classes) if totals[k] > 0}
        results[name] = result
    return results
