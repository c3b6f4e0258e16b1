"""torchvision architectures: hub-cache weights (never downloaded), state-dict files, and their quirks
(aux heads, DenseNet key names, ViT image size from the position embedding)."""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from mealkd.core.checkpoint_io import load_torch_file
from mealkd.core.models._helpers import LoadedModel, check_and_load, class_mismatch, checkpoint_class_names, find_head, head_classes, read_state_dict, recorded_norm, resolve_meta, file_sha256
from mealkd.core.models.spec import INIT_MODES, ModelSpec
from mealkd.errors import UserError, first_line

log = logging.getLogger(__name__)

_AUX_ARCHS = ("inception_v3", "googlenet")  # built without aux heads, with transform_input=True
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")
_LIST_TV = ('python -c "import torchvision; '
            'print(torchvision.models.list_models(module=torchvision.models))"')


def _tv_check_arch(spec: ModelSpec) -> str:
    import torchvision
    from torchvision.models import list_models

    arch = spec.arch or ""
    valid = list_models(module=torchvision.models)
    if arch in valid:
        return arch
    if arch in list_models():
        raise UserError(f"torchvision:{arch} (spec {spec.text}) is not an image-classification "
                        f"architecture; list valid names with: {_LIST_TV}")
    import difflib

    close = difflib.get_close_matches(arch, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown torchvision architecture {arch!r} in spec {spec.text}{hint}; "
                    f"list valid names with: {_LIST_TV}")


def _tv_build(arch: str, num_classes: int | None, *, init_weights: bool = True, device=None,
              **extra):
    from torchvision.models import get_model

    kwargs: dict[str, Any] = dict(extra)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if arch in _AUX_ARCHS:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", init_weights)
        # torchvision's pretrained inception/googlenet expect transform_input=True; mealkd builds
        # these archs that way always, so its own checkpoints round-trip through ARCH@FILE.
        kwargs.setdefault("transform_input", True)
    if device is not None:
        import torch

        with torch.device(device):
            return get_model(arch, weights=None, **kwargs)
    return get_model(arch, weights=None, **kwargs)


@lru_cache(maxsize=None)
def _tv_head_name(arch: str) -> str:
    if arch.startswith("regnet_"):  # its width computation cannot run on the meta device
        return "fc"
    try:
        model = _tv_build(arch, None, init_weights=False, device="meta")
    except Exception:  # noqa: BLE001 - fall back to a real (slower) build
        model = _tv_build(arch, None, init_weights=False)
    return find_head(model)[0]


def _tv_default_meta(arch: str, enum_name: str | None = None):
    """(crop size, mean, std) from the weights enum's transforms, or Nones."""
    try:
        from torchvision.models import get_model_weights

        enum = get_model_weights(arch)
        w = enum.DEFAULT if enum_name in (None, "DEFAULT") else enum[enum_name]
        t = w.transforms()
        size = int(t.crop_size[0]) if getattr(t, "crop_size", None) else None
        return size, tuple(t.mean), tuple(t.std)
    except Exception:  # noqa: BLE001 - metadata is optional
        return None, None, None


def hub_weights_path(arch: str, enum_name: str | None = None) -> tuple[Any, str]:
    """(weights enum member, the hub-cache file torchvision would load it from)."""
    import urllib.parse

    import torch
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if enum_name in (None, "DEFAULT"):
        w = enum.DEFAULT
    else:
        try:
            w = enum[enum_name]
        except KeyError:
            raise UserError(f"torchvision:{arch} has no weights {enum_name!r}; valid: "
                            f"{', '.join(m.name for m in enum)}") from None
    fname = os.path.basename(urllib.parse.urlparse(w.url).path)
    return w, os.path.join(torch.hub.get_dir(), "checkpoints", fname)


def _strip_aux(model) -> None:
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, name):
                setattr(model, name, None)


def _tv_from_hub(spec: ModelSpec, arch: str):
    """Build ARCH with its (default or named) weights from the hub cache; never downloads."""
    from torchvision.models import get_model

    w, path = hub_weights_path(arch, spec.weights_enum)
    if not os.path.isfile(path):
        raise UserError(f"weights for {spec.text} are not in the local torch hub cache: place "
                        f"{w.url} at {path} (mealkd never downloads), or use torchvision:{arch}@FILE.pth")
    sha = file_sha256(path)
    m = re.search(r"-([0-9a-f]{8,})\.\w+$", os.path.basename(path))
    if m and not sha.startswith(m.group(1)):
        log.warning("%s: sha256 %s does not start with the %s its name promises (not the official "
                    "file?)", path, sha[:12], m.group(1))
    # torchvision's builder unpickles the cached file with weights_only=False: refuse what a safe
    # load refuses first (costs a second read of the file, which is in the page cache by now).
    del_me = load_torch_file(path, "hub-cache weights")
    del del_me
    try:
        model = get_model(arch, weights=w)  # torchvision's builder: finds the cached file, remaps keys
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load hub-cache weights {path} for {spec.text} ({first_line(e, 300)}): "
                        "replace the file with a good copy of " + w.url) from None
    _strip_aux(model)
    return model, w, path, sha


_DENSENET_RE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _tv_fix_keys(arch: str, sd: dict) -> dict:
    if arch.startswith("densenet"):  # the original DenseNet files use 'norm.1' for 'norm1'
        sd = {(_DENSENET_RE.sub(r"\1\2", k)): v for k, v in sd.items()}
    if arch in _AUX_ARCHS:
        sd = {k: v for k, v in sd.items() if not k.startswith(_AUX_PREFIXES)}
    return sd


def _vit_size(spec: ModelSpec, arch: str) -> dict:
    """A ViT built from scratch is built for the spec's ``:size=`` (it takes that size only)."""
    if not (arch.startswith("vit_") and spec.size):
        return {}
    patch = int(arch.rsplit("_", 1)[-1])
    if spec.size % patch:
        raise UserError(f"{spec.text}: a ViT with {patch}-pixel patches needs a :size= that is a multiple of {patch} "
                        f"(e.g. {max(patch, spec.size // patch * patch)})")
    return {"image_size": spec.size}


def _check_fixed_size(spec: ModelSpec, model, path: str | None) -> None:
    fixed = getattr(model, "image_size", None)
    if fixed is not None and spec.size is not None and spec.size != fixed:
        raise UserError(f"{spec.text}: {path or 'the model'} is a ViT built for {fixed}x{fixed} images; drop :size= or set :size={fixed}")


def _tv_file_extra(arch: str, sd: Mapping) -> dict:
    """Constructor kwargs a state dict implies (ViT image size from its position embedding)."""
    extra: dict[str, Any] = {}
    if arch.startswith("vit_") and "encoder.pos_embedding" in sd and "conv_proj.weight" in sd:
        tokens = int(sd["encoder.pos_embedding"].shape[1]) - 1
        side = math.isqrt(tokens)
        if side * side == tokens:
            extra["image_size"] = side * int(sd["conv_proj.weight"].shape[-1])
    return extra


def load_torchvision(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    arch = _tv_check_arch(spec)
    _, d_mean, d_std = _tv_default_meta(arch, spec.weights_enum)  # its eval crop size is not used (module docstring)

    if init == "scratch":
        model = _tv_build(arch, num_classes, init_weights=True, **_vit_size(spec, arch))
        n = head_classes(find_head(model)[1])
        size, mean, std = resolve_meta(spec, getattr(model, "image_size", None), d_mean, d_std)
        return LoadedModel(spec, model, n, size, mean, std, None, None, size_fixed=hasattr(model, "image_size"))

    head = _tv_head_name(arch)
    names: list[str] | None = None
    extra: dict[str, Any] = {}
    hub_model = None
    recorded: tuple[Any, Any] = (None, None)
    if init in INIT_MODES and not spec.weights_file:  # weights / pretrained from the hub cache
        hub_model, _, path, sha = _tv_from_hub(spec, arch)
        sd = hub_model.state_dict()
        for attr in ("transform_input", "image_size"):
            if hasattr(hub_model, attr):
                extra[attr] = getattr(hub_model, attr)
        what = "hub-cache weights"
    else:
        file = spec.weights_file if init in INIT_MODES else init
        what = "weights file" if init in INIT_MODES else "init file"
        sd, outer, path = read_state_dict(file, what, spec.text)
        recorded = recorded_norm(outer, path)
        sd = _tv_fix_keys(arch, sd)
        sha = file_sha256(path)
        extra = _tv_file_extra(arch, sd)
        if head + ".weight" not in sd:
            raise UserError(f"{what} {file} is not a state dict for torchvision:{arch}: it has no "
                            f"{head + '.weight'!r} (first keys: {', '.join(list(sd)[:3])}); "
                            "is it a checkpoint of another architecture?")
        names = checkpoint_class_names(outer, int(sd[head + ".weight"].shape[0]), path)

    ckpt_n = int(sd[head + ".weight"].shape[0])
    want = ckpt_n if num_classes is None else int(num_classes)
    reinit = False
    if want != ckpt_n and init == "weights":
        raise class_mismatch(spec, ckpt_n, want)
    if hub_model is not None and want == ckpt_n:
        model = hub_model
    elif want != ckpt_n and init == "pretrained":
        model = _tv_build(arch, want, init_weights=True, **extra)
        body = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
        check_and_load(model, body, what=what, path=path, spec_text=spec.text, head=None, want=None,
                        skip=(head + ".",))
        reinit, names = True, None
        log.info("%s: loaded %s except the classifier %r; re-initialised it for %d classes "
                 "(the weights have %d)", spec.text, path, head, want, ckpt_n)
    else:
        model = _tv_build(arch, want, init_weights=False, **extra)
        check_and_load(model, sd, what=what, path=path, spec_text=spec.text, head=head, want=want)
    _check_fixed_size(spec, model, path)
    n = head_classes(find_head(model)[1])
    size, mean, std = resolve_meta(spec, extra.get("image_size"), d_mean, d_std, recorded)  # only a ViT has a fixed size
    return LoadedModel(spec, model, n, size, mean, std, sha, names, reinit, path, size_fixed="image_size" in extra)
