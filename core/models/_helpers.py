"""What every source shares: the LoadedModel record, weights-file reading (one safe torch.load policy, state-dict
unwrapping, strict loading with one-line errors), classifier-head discovery and input metadata."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mealkd.core.checkpoint_io import CHECKPOINT_FORMAT, export_record, load_torch_file
from mealkd.core.models.spec import IMAGENET_MEAN, IMAGENET_STD, INIT_MODES, ModelSpec
from mealkd.errors import MissingFile, UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: "torch.nn.Module"
    num_classes: int
    input_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str | None
    class_names: list[str] | None
    head_reinitialized: bool = False  # init="pretrained" replaced the classifier (class count differed)
    weights_path: str | None = None   # the file the weights came from (hub cache, @FILE, .pt, init file)
    weights_kind: str = "raw"  # which weights of a distill checkpoint were loaded: 'raw' or 'ema'
    size_fixed: bool = False  # the module takes input_size x input_size images only (a static .pt2, a torchvision ViT)

    @property
    def weight(self) -> float:
        return self.spec.weight


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except FileNotFoundError:
        raise MissingFile(f"file {path} does not exist: check the path") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def describe(model: LoadedModel) -> dict[str, Any]:
    """JSON-able record of a loaded model, for the label store's ``teachers`` attribute."""
    s = model.spec
    return {
        "spec": s.text,
        "source": s.source,
        "arch": s.arch,
        "weights_file": model.weights_path,
        "weights_sha256": model.weights_sha256,
        "num_classes": int(model.num_classes),
        "input_size": model.input_size,
        "mean": [float(v) for v in model.mean],
        "std": [float(v) for v in model.std],
        "weight": float(s.weight),
    }


def _resolve_init(init: str) -> str:
    if not isinstance(init, str) or not init:
        raise UserError(f"init must be one of {', '.join(INIT_MODES)} or a checkpoint path, got {init!r}")
    return init


def class_mismatch(spec: ModelSpec, have: int, want: int) -> UserError:
    return UserError(f"model {spec.text} predicts {have} classes but the dataset/store has {want}: "
                     f"use weights trained on these {want} classes, their outputs in the dataset's sorted class order")


def resolve_meta(spec: ModelSpec, size: int | None, mean: Any, std: Any, recorded: tuple[Any, Any] = (None, None)):
    """(input size, mean, std): the spec's own ``:size=``/``:mean=``/``:std=`` first, then what the weights
    file records (``recorded``: :func:`recorded_norm`), then the architecture's defaults, then ImageNet's."""
    m = tuple(float(v) for v in (spec.mean or recorded[0] or mean or IMAGENET_MEAN))
    s = tuple(float(v) for v in (spec.std or recorded[1] or std or IMAGENET_STD))
    return (spec.size if spec.size is not None else size), m, s


def recorded_norm(outer: Mapping, path: str) -> tuple[Any, Any]:
    """(mean, std) that a weights file records for the model it holds: a ``mealkd distill`` checkpoint's
    ``norm`` (what the student trained with), or the record ``mealkd export`` writes beside a state dict
    (``FILE.json``); (None, None) if neither. A student trained at mean/std 0.5 stays so when it is
    reused as a teacher or as ``--init`` (ImageNet's defaults were taken, silently)."""
    norm = outer.get("norm") if outer and outer.get("format") == CHECKPOINT_FORMAT else None
    if not isinstance(norm, Mapping):
        norm = export_record(path)
    mean, std = norm.get("mean"), norm.get("std")
    ok = all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std))
    return (tuple(mean), tuple(std)) if ok else (None, None)


# ---------------------------------------------------------------- checkpoint files
#: where training scripts keep a model's weights in a checkpoint dict, and its EMA copy (timm, mealkd, others)
RAW_KEYS = ("model", "state_dict", "model_state_dict", "model_state")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")


def _first_state_dict(obj: Mapping, keys: tuple[str, ...]) -> tuple[str, Mapping] | None:
    """(key, state dict) of the first of ``keys`` under which ``obj`` holds one (a module counts), else None."""
    import torch

    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return key, inner
    return None


def read_state_dict(path: str, what: str, spec_text: str):
    """-> (state dict, the checkpoint dict it came from (or {}), resolved path)."""
    import torch

    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        raise MissingFile(f"{what} {path} (for {spec_text}) does not exist: check the path")
    obj = load_torch_file(p, what)
    outer: Mapping = {}
    if isinstance(obj, Mapping):
        raw = _first_state_dict(obj, RAW_KEYS)
        ema = _first_state_dict(obj, EMA_KEYS)
        if raw is not None:
            outer, obj = obj, raw[1]
            ours = outer.get("format") == CHECKPOINT_FORMAT
            if ema is not None and not (ours and what == "init file"):  # distill's --init-weights chooses for its own checkpoints
                log.warning("%s %s: holds EMA weights too (under %r); the raw weights (under %r) were loaded%s", what, path, ema[0],
                            raw[0], ": `mealkd export` it with --weights ema for a file of the EMA weights" if ours else "")
        elif ema is not None:  # only an EMA copy (a file saved for inference)
            log.warning("%s %s: loaded the EMA weights under %r (it holds no raw weights)", what, path, ema[0])
            outer, obj = obj, ema[1]
    elif isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{what} {path} holds no state dict (found {keys}): save model.state_dict(), "
                        "or a dict with it under 'model' or 'state_dict'")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:  # DDP ('module.') and torch.compile ('_orig_mod.') wrappers, in any nesting
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd, outer, p


def checkpoint_class_names(outer: Mapping, n: int, path: str) -> list[str] | None:
    names = outer.get("class_names") if outer else None
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
        log.warning("ignoring malformed 'class_names' in %s", path)
        return None
    if len(names) != n:
        log.warning("ignoring 'class_names' in %s: %d names for a %d-class head", path, len(names), n)
        return None
    return list(names)


def check_and_load(model, sd: Mapping, *, what: str, path: str, spec_text: str, head: str | None,
                    want: int | None, skip: tuple[str, ...] = ()) -> None:
    """Strictly load ``sd`` into ``model`` with one-line errors (missing/unexpected keys, shapes)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")
               and not k.startswith(skip)]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        raise UserError(f"{what} {path} does not match {spec_text}: {' and '.join(parts)}; "
                        "is it a checkpoint of another architecture?")
    for k, v in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            msg = (f"{what} {path} does not fit {spec_text}: layer {k!r} has shape "
                   f"{tuple(sd[k].shape)} in the checkpoint but {tuple(v.shape)} in the model")
            if head and k.startswith(head + ".") and want is not None:
                msg += (f" (the store has {want} classes; the checkpoint head has {sd[k].shape[0]}: "
                        f"to keep its body and train a new head, name the file in the spec "
                        f"({spec_text.split('@')[0]}@{path}) and use init=pretrained (--init pretrained), or a checkpoint "
                        f"trained on {want} classes)")
            raise UserError(msg)
    model.load_state_dict(sd, strict=False)



def find_head(model) -> tuple[str, Any]:
    """The final classifier: the last nn.Linear, else (squeezenet) the last Conv2d."""
    import torch

    head = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            head = (name, mod)
    if head is None:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                head = (name, mod)
    if head is None:
        raise UserError(f"cannot find the classifier layer of {type(model).__name__}")
    return head


def head_classes(mod) -> int:
    return int(getattr(mod, "out_features", None) or mod.out_channels)
