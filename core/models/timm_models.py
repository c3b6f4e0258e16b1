"""timm architectures (only when timm is installed; never downloads: HF_HUB_OFFLINE is forced)."""
from __future__ import annotations

import os
from typing import Any

from mealkd.core.models._helpers import LoadedModel, check_and_load, class_mismatch, checkpoint_class_names, find_head, read_state_dict, recorded_norm, resolve_meta, file_sha256
from mealkd.core.models.spec import INIT_MODES, ModelSpec
from mealkd.errors import UserError, first_line




# ---------------------------------------------------------------- timm
def _import_timm(spec: ModelSpec):
    try:
        import timm  # noqa: PLC0415
    except ImportError:
        raise UserError(f"timm is not installed: pip install timm (needed for {spec.text})") from None
    return timm


def _timm_meta(model) -> tuple[int | None, Any, Any]:
    """(fixed input size or None, mean, std): the pretrained config's eval size is not used (module
    docstring); a model whose patch embedding only accepts one size (timm ViTs) needs that size."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None) if getattr(embed, "strict_img_size", False) else None
    return (int(fixed[-1]) if fixed else None), cfg.get("mean"), cfg.get("std")


def _timm_head_name(model) -> str:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, mod in model.named_modules():
        if clf is not None and mod is clf:
            return name
    return find_head(model)[0]


def load_timm(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    timm = _import_timm(spec)
    arch = spec.arch or ""
    if hasattr(timm, "is_model") and not timm.is_model(arch.split(".")[0]):
        raise UserError(f"unknown timm architecture {arch!r} in spec {spec.text}; list valid names "
                        "with: python -c \"import timm; print(timm.list_models())\"")

    def create(**kw):
        try:
            return timm.create_model(arch, **kw)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"timm could not build {spec.text} ({first_line(e, 300)}): for pretrained "
                            f"weights, put them in the local Hugging Face cache or use timm:{arch}@FILE") from None

    if init == "scratch":
        kw = {} if num_classes is None else {"num_classes": int(num_classes)}
        model = create(pretrained=False, **kw)
        size, mean, std = resolve_meta(spec, *_timm_meta(model))
        return LoadedModel(spec, model, int(model.num_classes), size, mean, std, None, None)

    if init in INIT_MODES and not spec.weights_file:
        old = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # never download (honoured by fresh hub imports)
        try:
            model = create(pretrained=True)
            n = int(model.num_classes)
            reinit = False
            if num_classes is not None and int(num_classes) != n:
                if init == "weights":
                    raise class_mismatch(spec, n, int(num_classes))
                model = create(pretrained=True, num_classes=int(num_classes))  # timm resets the head
                reinit = True
        finally:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
        size, mean, std = resolve_meta(spec, *_timm_meta(model))
        return LoadedModel(spec, model, int(model.num_classes), size, mean, std, None, None, reinit)

    file = spec.weights_file if init in INIT_MODES else init
    what = "weights file" if init in INIT_MODES else "init file"
    sd, outer, path = read_state_dict(file, what, spec.text)
    probe = create(pretrained=False)
    head = _timm_head_name(probe)
    if head + ".weight" not in sd:
        raise UserError(f"{what} {file} is not a state dict for timm:{arch}: it has no "
                        f"{head + '.weight'!r}; is it a checkpoint of another architecture?")
    ckpt_n = int(sd[head + ".weight"].shape[0])
    want = ckpt_n if num_classes is None else int(num_classes)
    if want != ckpt_n and init == "weights":
        raise class_mismatch(spec, ckpt_n, want)
    model = create(pretrained=False, num_classes=want)
    reinit = False
    names = checkpoint_class_names(outer, ckpt_n, path)
    if want != ckpt_n and init == "pretrained":
        body = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
        check_and_load(model, body, what=what, path=path, spec_text=spec.text, head=None, want=None,
                        skip=(head + ".",))
        reinit, names = True, None
    else:
        check_and_load(model, sd, what=what, path=path, spec_text=spec.text, head=head, want=want)
    size, mean, std = resolve_meta(spec, *_timm_meta(model), recorded_norm(outer, path))
    return LoadedModel(spec, model, int(model.num_classes), size, mean, std, file_sha256(path), names,
                       reinit, path)
