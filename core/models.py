"""Model specs: one grammar for teachers (stage one) and students (stage two).

A *spec* names a model and, optionally, how to feed it::

    torchvision:ARCH                 torchvision architecture + its DEFAULT weights, read ONLY from the
                                     local torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``)
    torchvision:ARCH@WEIGHTS         another weights enum member of ARCH, e.g. ``resnet50@IMAGENET1K_V2``
                                     (an all-caps name without '.' or '/'), also from the hub cache
    torchvision:ARCH@FILE.pth        ARCH + a state dict file (plain, or under 'model'/'state_dict';
                                     'module.' / '_orig_mod.' prefixes are stripped); the class count
                                     is read from the file's classifier weight
    timm:ARCH[@FILE]                 the same through timm (only if timm is installed)
    FILE.pt                          a TorchScript archive (torch.jit.load); also ``torchscript:PATH``
                                     for names that would otherwise be ambiguous
    FILE.pt2                         a torch.export ExportedProgram (torch.export.save; loaded with
                                     torch.export.load and used as ``.module()``); also ``export:PATH``.
                                     Its input size is ``:size=N``, else the example input's H x W
                                     recorded in the program (a dynamic H/W: the run's crop size)

followed by options, each introduced by ``:``::

    :w=0.5                           weight in the ensemble average (default 1, must be > 0)
    :size=224                        input size in pixels (see "Input size" below)
    :mean=0.485/0.456/0.406          per-channel mean ('/'-separated; one value = all channels)
    :std=0.229/0.224/0.225           per-channel std

Input size (one rule for every source): a model's input size is its ``:size=N`` if given; else,
for an architecture that only accepts one size (a ViT: from its position embedding), that size;
else None, which means "the crop size of the run": precompute's ``--image-size`` (the size the
store records) for a teacher, the training size for a student. In particular, a hub-cache
torchvision/timm teacher does NOT get its weights' own eval crop (e.g. 380 for efficientnet_b4):
``torchvision:ARCH`` and ``torchvision:ARCH@FILE.pth`` see the same pixels. Mean/std do come from
the weights' metadata where there is some (else ImageNet's), unless ``:mean``/``:std`` are given.

``--teachers`` takes a comma-separated list of specs (:func:`parse_spec_list`). Limitations, by
design: a path may not contain ',' (the list separator); a path component after the first may not
look like ``word=...`` (it would be read as an option); a bare file name whose part before a ':' is
a plain word (``mymodel:v2.pt``) is read as an unknown source — write ``./mymodel:v2.pt`` or
``torchscript:mymodel:v2.pt``.

inception_v3 / googlenet are always built without auxiliary heads and with transform_input=True
(torchvision's pretrained convention), so a checkpoint of a model built here round-trips.

Nothing here downloads: missing weights are a :class:`UserError` naming the file to place.
Everything user-fixable raises :class:`storage.errors.UserError` with a one-line message.
torch/torchvision are imported lazily so that parsing specs (and ``mealkd --help``) stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from mealkd.core.checkpoint_io import TRUST_ENV, load_torch_file  # noqa: F401 - TRUST_ENV re-exported
from mealkd.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SOURCES = ("torchvision", "timm", "torchscript", "export")
FILE_SOURCES = ("torchscript", "export")  # the file is the model (architecture and weights): used as-is
INIT_MODES = ("weights", "pretrained", "scratch")  # anything else is a file path

_GRAMMAR = ("expected torchvision:ARCH[@FILE], timm:ARCH[@FILE], FILE.pt (TorchScript) or FILE.pt2 (torch.export), "
            "optionally followed by :w=W :size=N :mean=M/M/M :std=S/S/S")
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript", ".ptl")
_EXPORT_SUFFIXES = (".pt2",)
_OPTION_RE = re.compile(r"^([A-Za-z_]\w*)=(.*)$")
_SOURCE_RE = re.compile(r"^([A-Za-z][\w-]*):(.*)$", re.S)
_ARCH_RE = re.compile(r"^[A-Za-z0-9_][\w.\-]*$")
_ENUM_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_AUX_ARCHS = ("inception_v3", "googlenet")  # built without aux heads, with transform_input=True
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")
_LIST_TV = ('python -c "import torchvision; '
            'print(torchvision.models.list_models(module=torchvision.models))"')


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``weights_enum`` (extra) is set for ``torchvision:ARCH@IMAGENET1K_V2``."""

    text: str
    source: str  # 'torchvision' | 'timm' | 'torchscript' | 'export'
    arch: str | None
    weights_file: str | None
    weight: float = 1.0
    size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    weights_enum: str | None = None

    def __str__(self) -> str:
        return self.text


def _bad(text: str, problem: str) -> UserError:
    return UserError(f"bad model spec {text!r}: {problem}; {_GRAMMAR}")


def _parse_triple(text: str, key: str, value: str) -> tuple[float, float, float]:
    items = value.split("/")
    if len(items) not in (1, 3):
        raise _bad(text, f"{key}= needs 3 '/'-separated numbers (e.g. {key}=0.5/0.5/0.5), got {value!r}")
    try:
        nums = [float(v) for v in items]
    except ValueError:
        raise _bad(text, f"{key}= needs numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in nums):
        raise _bad(text, f"{key}= values must be finite, got {value!r}")
    if key == "std" and not all(v > 0 for v in nums):
        raise _bad(text, f"std= values must be > 0, got {value!r}")
    if len(nums) == 1:
        nums = nums * 3
    return (nums[0], nums[1], nums[2])


def _parse_option(text: str, key: str, value: str) -> tuple[str, Any]:
    key = {"weight": "w"}.get(key, key)
    if key == "w":
        try:
            w = float(value)
        except ValueError:
            raise _bad(text, f"w= needs a number, got {value!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise _bad(text, f"w= must be a finite number > 0, got {value!r}")
        return "weight", w
    if key == "size":
        if not re.fullmatch(r"\d+", value.strip()) or int(value) <= 0:
            raise _bad(text, f"size= needs a positive integer, got {value!r}")
        return "size", int(value)
    if key in ("mean", "std"):
        return key, _parse_triple(text, key, value)
    raise _bad(text, f"unknown option {key!r} (valid: w, size, mean, std)")


def rest_is_pt2(path: str) -> bool:
    """Whether a bare spec names an ExportedProgram file (``.pt2``)."""
    return path.lower().endswith(_EXPORT_SUFFIXES)


def parse_spec(text: str) -> ModelSpec:
    """Parse one spec (see the module docstring). UserError on anything malformed."""
    if not isinstance(text, str):
        raise UserError(f"model spec must be a string, got {type(text).__name__}")
    raw = text.strip()
    if not raw:
        raise UserError(f"empty model spec; {_GRAMMAR}")
    if "\n" in raw or "," in raw:
        raise _bad(raw, "one spec may not contain ',' or a newline (use parse_spec_list for lists; "
                   "paths may not contain ',')")
    parts = raw.split(":")
    opts: dict[str, Any] = {}
    # Options are the trailing ':key=value' segments; the first segment is never an option.
    while len(parts) > 1 and _OPTION_RE.match(parts[-1]):
        key, value = _OPTION_RE.match(parts.pop()).groups()  # type: ignore[union-attr]
        name, parsed = _parse_option(raw, key, value)
        if name in opts:
            raise _bad(raw, f"option {key!r} given twice")
        opts[name] = parsed
    body = ":".join(parts)
    if not body:
        raise _bad(raw, "no model before the options")

    m = _SOURCE_RE.match(body)
    arch: str | None = None
    weights_file: str | None = None
    weights_enum: str | None = None
    if m and m.group(1).lower() in SOURCES:
        source, rest = m.group(1).lower(), m.group(2)
    elif m and "/" not in m.group(1) and len(m.group(1)) > 1:
        raise _bad(raw, f"unknown model source {m.group(1)!r} (valid: {', '.join(SOURCES)})")
    else:
        source, rest = ("export" if rest_is_pt2(body) else "torchscript"), body
        if source == "torchscript" and not (rest.lower().endswith(_TORCHSCRIPT_SUFFIXES) or "/" in rest or os.sep in rest):
            hint = (f"did you mean torchvision:{rest}?" if _ARCH_RE.match(rest)
                    else "a TorchScript file must end in .pt, an ExportedProgram in .pt2 (or give torchscript:PATH / export:PATH)")
            raise _bad(raw, f"{rest!r} is neither SOURCE:ARCH nor a TorchScript (.pt) or ExportedProgram (.pt2) file: {hint}")

    if source in FILE_SOURCES:
        if not rest.strip():
            raise _bad(raw, f"{source}: needs a file path")
        weights_file = rest
    else:
        arch, at, file_part = rest.partition("@")
        if not arch:
            raise _bad(raw, f"{source}: needs an architecture name (e.g. {source}:resnet50)")
        if not _ARCH_RE.match(arch):
            raise _bad(raw, f"{arch!r} is not a valid architecture name (misplaced ':' or option?)")
        if at and not file_part.strip():
            raise _bad(raw, "nothing after '@': give a weights file (ARCH@FILE.pth)")
        if source == "torchvision":
            arch = arch.lower()
            if at and _ENUM_RE.match(file_part):
                weights_enum = file_part
            elif at:
                weights_file = file_part
        elif at:
            weights_file = file_part
    return ModelSpec(text=raw, source=source, arch=arch, weights_file=weights_file,
                     weights_enum=weights_enum, **opts)


def parse_spec_list(text: str) -> list[ModelSpec]:
    """Split a comma-separated ``--teachers`` value into specs. Paths may not contain ','."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"no model specs given; {_GRAMMAR} (several separated by ',')")
    specs = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if not item:
            raise UserError(f"empty entry #{i + 1} in model list {text!r}: remove the extra ','")
        if re.fullmatch(r"[-+.\d eE]+", item):
            raise UserError(f"{item!r} in model list {text!r} is not a model spec: separate mean/std "
                            "channels with '/', not ',' (e.g. :mean=0.485/0.456/0.406)")
        specs.append(parse_spec(item))
    return specs


# --------------------------------------------------------------------------------------------
# Loaded models
# --------------------------------------------------------------------------------------------
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
        raise UserError(f"file {path} does not exist: check the path") from None
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


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


def _resolve_init(init: str) -> str:
    if not isinstance(init, str) or not init:
        raise UserError(f"init must be one of {', '.join(INIT_MODES)} or a checkpoint path, got {init!r}")
    return init


def load_model(spec: ModelSpec | str, *, num_classes: int | None = None,
               init: str = "weights") -> LoadedModel:
    """Build the model a spec names.

    init="weights"    the spec's own weights (hub cache / enum / @FILE / .pt); the module is put in
                      eval() mode (teacher behaviour). num_classes, if given, must match.
    init="pretrained" the spec's own weights too, but if num_classes differs from theirs, everything
                      except the classifier is loaded and the head is re-initialised
                      (``head_reinitialized=True``, logged).
    init="scratch"    the architecture with num_classes outputs and random initialisation.
    init=<path>       a state dict / checkpoint loaded strictly into the architecture built with
                      num_classes (inferred from the file when None); it takes precedence over a
                      spec's own '@FILE'/'@WEIGHTS' (a student reloaded from its checkpoint).
                      For a TorchScript (.pt) or ExportedProgram (.pt2) spec the file is the
                      architecture: the checkpoint's state dict is loaded into it (such a student's
                      ``distill`` checkpoint).
    Every file is read through :func:`core.checkpoint_io.load_torch_file` (weights_only policy).
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    init = _resolve_init(init)
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if init not in INIT_MODES and (spec.weights_file or spec.weights_enum) and spec.source not in FILE_SOURCES:
        # e.g. a student trained from ARCH@start.pth, reloaded from its own checkpoint
        log.info("%s: loading weights from init file %s instead of the spec's '@...'", spec.text, init)
    if init == "scratch" and (spec.weights_file or spec.weights_enum) and spec.source not in FILE_SOURCES:
        raise UserError(f"spec {spec.text} names weights but init is 'scratch': drop the '@...' part "
                        "or use init=pretrained")
    if spec.source == "torchvision":
        loaded = _load_torchvision(spec, num_classes, init)
    elif spec.source == "timm":
        loaded = _load_timm(spec, num_classes, init)
    elif spec.source == "export":
        loaded = _load_exported(spec, num_classes, init)
    else:
        loaded = _load_torchscript(spec, num_classes, init)
    if init == "weights":
        loaded.module.eval()
    return loaded


def _class_mismatch(spec: ModelSpec, have: int, want: int) -> UserError:
    return UserError(f"model {spec.text} predicts {have} classes but the dataset/store has {want}: "
                     f"use weights trained on these {want} classes (ARCH@FILE.pth), or init=pretrained "
                     "to re-initialise a student's head")


def _resolve_meta(spec: ModelSpec, size: int | None, mean: Any, std: Any):
    m = tuple(float(v) for v in (spec.mean or mean or IMAGENET_MEAN))
    s = tuple(float(v) for v in (spec.std or std or IMAGENET_STD))
    return (spec.size if spec.size is not None else size), m, s


# ---------------------------------------------------------------- checkpoint files
def _read_state_dict(path: str, what: str, spec_text: str):
    """-> (state dict, the checkpoint dict it came from (or {}), resolved path)."""
    import torch

    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        raise UserError(f"{what} {path} (for {spec_text}) does not exist: check the path")
    obj = load_torch_file(p, what)
    outer: Mapping = {}
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "model_state"):
            inner = obj.get(key)
            if isinstance(inner, torch.nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                outer, obj = obj, inner
                break
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


def _class_names(outer: Mapping, n: int, path: str) -> list[str] | None:
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


def _check_and_load(model, sd: Mapping, *, what: str, path: str, spec_text: str, head: str | None,
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


# ---------------------------------------------------------------- torchvision
def _find_head(model) -> tuple[str, Any]:
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


def _head_classes(mod) -> int:
    return int(getattr(mod, "out_features", None) or mod.out_channels)


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
    return _find_head(model)[0]


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
        raise UserError(f"cannot load hub-cache weights {path} for {spec.text} ({_one_line(e)}): "
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


def _tv_file_extra(arch: str, sd: Mapping) -> dict:
    """Constructor kwargs a state dict implies (ViT image size from its position embedding)."""
    extra: dict[str, Any] = {}
    if arch.startswith("vit_") and "encoder.pos_embedding" in sd and "conv_proj.weight" in sd:
        tokens = int(sd["encoder.pos_embedding"].shape[1]) - 1
        side = math.isqrt(tokens)
        if side * side == tokens:
            extra["image_size"] = side * int(sd["conv_proj.weight"].shape[-1])
    return extra


def _load_torchvision(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    arch = _tv_check_arch(spec)
    _, d_mean, d_std = _tv_default_meta(arch, spec.weights_enum)  # its eval crop size is not used (module docstring)

    if init == "scratch":
        model = _tv_build(arch, num_classes, init_weights=True)
        n = _head_classes(_find_head(model)[1])
        size, mean, std = _resolve_meta(spec, None, d_mean, d_std)
        return LoadedModel(spec, model, n, size, mean, std, None, None)

    head = _tv_head_name(arch)
    names: list[str] | None = None
    extra: dict[str, Any] = {}
    hub_model = None
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
        sd, outer, path = _read_state_dict(file, what, spec.text)
        sd = _tv_fix_keys(arch, sd)
        sha = file_sha256(path)
        extra = _tv_file_extra(arch, sd)
        if head + ".weight" not in sd:
            raise UserError(f"{what} {file} is not a state dict for torchvision:{arch}: it has no "
                            f"{head + '.weight'!r} (first keys: {', '.join(list(sd)[:3])}); "
                            "is it a checkpoint of another architecture?")
        names = _class_names(outer, int(sd[head + ".weight"].shape[0]), path)

    ckpt_n = int(sd[head + ".weight"].shape[0])
    want = ckpt_n if num_classes is None else int(num_classes)
    reinit = False
    if want != ckpt_n and init == "weights":
        raise _class_mismatch(spec, ckpt_n, want)
    if hub_model is not None and want == ckpt_n:
        model = hub_model
    elif want != ckpt_n and init == "pretrained":
        model = _tv_build(arch, want, init_weights=True, **extra)
        body = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
        _check_and_load(model, body, what=what, path=path, spec_text=spec.text, head=None, want=None,
                        skip=(head + ".",))
        reinit, names = True, None
        log.info("%s: loaded %s except the classifier %r; re-initialised it for %d classes "
                 "(the weights have %d)", spec.text, path, head, want, ckpt_n)
    else:
        model = _tv_build(arch, want, init_weights=False, **extra)
        _check_and_load(model, sd, what=what, path=path, spec_text=spec.text, head=head, want=want)
    n = _head_classes(_find_head(model)[1])
    size, mean, std = _resolve_meta(spec, extra.get("image_size"), d_mean, d_std)  # only a ViT has a fixed size
    return LoadedModel(spec, model, n, size, mean, std, sha, names, reinit, path)


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
    return _find_head(model)[0]


def _load_timm(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
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
            raise UserError(f"timm could not build {spec.text} ({_one_line(e)}): for pretrained "
                            f"weights, put them in the local Hugging Face cache or use timm:{arch}@FILE") from None

    if init == "scratch":
        kw = {} if num_classes is None else {"num_classes": int(num_classes)}
        model = create(pretrained=False, **kw)
        size, mean, std = _resolve_meta(spec, *_timm_meta(model))
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
                    raise _class_mismatch(spec, n, int(num_classes))
                model = create(pretrained=True, num_classes=int(num_classes))  # timm resets the head
                reinit = True
        finally:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
        size, mean, std = _resolve_meta(spec, *_timm_meta(model))
        return LoadedModel(spec, model, int(model.num_classes), size, mean, std, None, None, reinit)

    file = spec.weights_file if init in INIT_MODES else init
    what = "weights file" if init in INIT_MODES else "init file"
    sd, outer, path = _read_state_dict(file, what, spec.text)
    probe = create(pretrained=False)
    head = _timm_head_name(probe)
    if head + ".weight" not in sd:
        raise UserError(f"{what} {file} is not a state dict for timm:{arch}: it has no "
                        f"{head + '.weight'!r}; is it a checkpoint of another architecture?")
    ckpt_n = int(sd[head + ".weight"].shape[0])
    want = ckpt_n if num_classes is None else int(num_classes)
    if want != ckpt_n and init == "weights":
        raise _class_mismatch(spec, ckpt_n, want)
    model = create(pretrained=False, num_classes=want)
    reinit = False
    names = _class_names(outer, ckpt_n, path)
    if want != ckpt_n and init == "pretrained":
        body = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
        _check_and_load(model, body, what=what, path=path, spec_text=spec.text, head=None, want=None,
                        skip=(head + ".",))
        reinit, names = True, None
    else:
        _check_and_load(model, sd, what=what, path=path, spec_text=spec.text, head=head, want=want)
    size, mean, std = _resolve_meta(spec, *_timm_meta(model))
    return LoadedModel(spec, model, int(model.num_classes), size, mean, std, file_sha256(path), names,
                       reinit, path)


# ---------------------------------------------------------------- TorchScript
def _jit_load(spec: ModelSpec):
    """(scripted module, resolved path) of a TorchScript spec."""
    import torch

    file = spec.weights_file or ""
    path = os.path.expanduser(file)
    if not os.path.isfile(path):
        raise UserError(f"TorchScript file {file} does not exist: check the path")
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated" is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu"), path
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{file} is not a TorchScript file ({_one_line(e)}); for a state dict, name its "
                        f"architecture: torchvision:ARCH@{file}") from None


def _torchscript_classes(module, spec: ModelSpec, size: int | None, kind: str = "TorchScript") -> int:
    """The class count of a scripted (or exported) classifier, from one forward pass on a zero image."""
    import torch

    file, probe = spec.weights_file, size or 224
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, probe, probe))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot run {kind} model {file} on a 1x3x{probe}x{probe} float input to "
                        f"find its class count ({_one_line(e)}): pass the input size, e.g. {spec.text}:size=N") from None
    finally:
        module.train(was_training)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{kind} model {file} returns {shape}, not (batch, classes) logits")
    return int(out.shape[1])


def _load_torchscript(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    """The scripted module as saved (init weights/pretrained), or the scripted module with the state
    dict of a checkpoint loaded into it (init=<path>: a TorchScript student trained by ``distill``,
    whose checkpoint holds the scripted module's state dict)."""
    if init == "scratch":
        raise UserError(f"{spec.text} is a TorchScript file, which cannot be re-initialised (init=scratch): "
                        "use init=pretrained to start from its weights, or an architecture spec such as torchvision:ARCH")
    module, path = _jit_load(spec)
    names: list[str] | None = None
    if init not in INIT_MODES:
        sd, outer, path = _read_state_dict(init, "init file", spec.text)
        _check_and_load(module, sd, what="init file", path=path, spec_text=spec.text, head=None, want=None)
    size, mean, std = _resolve_meta(spec, None, None, None)
    n = _torchscript_classes(module, spec, size)
    if init not in INIT_MODES:
        names = _class_names(outer, n, path)
    if num_classes is not None and int(num_classes) != n:
        raise _class_mismatch(spec, n, int(num_classes))
    return LoadedModel(spec, module, n, size, mean, std, file_sha256(path), names, False, path)


# ---------------------------------------------------------------- torch.export (.pt2)
def _fixed_mode_train(self, mode: bool = True):
    """``train()``/``eval()`` of an ExportedProgram's module: only the ``training`` flags change. The graph
    runs as it was exported (export captures eval behaviour: BatchNorm uses its running statistics,
    dropout is off); torch refuses train()/eval() on such modules, which would break every caller."""
    import torch

    return torch.nn.Module.train(self, mode)


def _exported_input_size(program, spec: ModelSpec) -> int | None:
    """The square H = W of the program's (first) example input if static, None if dynamic; UserError if
    the program's batch dimension is fixed (mealkd feeds batches of any size) or H != W."""
    names = list(program.graph_signature.user_inputs)
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and names and n.name == names[0]), None)
    val = node.meta.get("val") if node is not None else None
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) != 4:
        raise UserError(f"ExportedProgram {spec.weights_file} does not take one (batch, 3, H, W) image tensor "
                        f"(its first input is {tuple(shape) if shape is not None else 'not a tensor'}); export an image classifier")
    static = [isinstance(d, int) for d in shape]  # a dynamic dimension is a torch.SymInt
    if static[0]:
        raise UserError(f"ExportedProgram {spec.weights_file} was exported for a fixed batch of {int(shape[0])}: export it "
                        "with a dynamic batch, e.g. torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
                        "or use `mealkd export --format pt2`")
    if not (static[2] and static[3]):
        return None
    h, w = int(shape[2]), int(shape[3])
    if h != w:
        raise UserError(f"ExportedProgram {spec.weights_file} takes {h}x{w} images but mealkd feeds square crops: export it at "
                        "a square size (or with dynamic H/W and give :size=N)")
    if spec.size is not None and spec.size != h:
        raise UserError(f"{spec.text}: :size={spec.size} but the program was exported for {h}x{h} inputs only; drop :size "
                        "or export it at that size (or with dynamic H/W)")
    return h


def _export_load(spec: ModelSpec):
    """(ExportedProgram, resolved path) of a ``.pt2`` spec; the weights inside are read with torch.load
    forced to weights_only (mealkd's policy) unless MEALKD_TRUST_CHECKPOINTS=1."""
    import torch

    from mealkd.core.checkpoint_io import trusted

    file = spec.weights_file or ""
    path = os.path.expanduser(file)
    if not os.path.isfile(path):
        raise UserError(f"ExportedProgram file {file} does not exist: check the path")
    key, old = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    if not trusted():
        os.environ[key] = "1"  # torch.export.load falls back to full unpickling otherwise
    quiet = [logging.getLogger(name) for name in ("torch.export", "torch._export.serde.serialize")]
    levels = [q.level for q in quiet]
    for q in quiet:  # torch logs a traceback before raising on a bad file; the UserError below says it in one line
        q.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(path), path
    except Exception as e:  # noqa: BLE001
        hint = "" if trusted() else f" (if it holds Python objects that you trust, set {TRUST_ENV}=1)"
        raise UserError(f"{file} is not a torch.export ExportedProgram file ({_one_line(e)}); save one with "
                        f"torch.export.save, or `mealkd export --format pt2`{hint}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _load_exported(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    """The program's module as saved (init weights/pretrained), or with a checkpoint's state dict loaded
    into it (init=<path>: a .pt2 student trained by ``distill``). Like TorchScript, it cannot be rebuilt."""
    import types

    if init == "scratch":
        raise UserError(f"{spec.text} is an ExportedProgram file, which cannot be re-initialised (init=scratch): "
                        "use init=pretrained to start from its weights, or an architecture spec such as torchvision:ARCH")
    program, path = _export_load(spec)
    recorded = _exported_input_size(program, spec)
    try:
        module = program.module()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ExportedProgram {spec.weights_file}: torch cannot turn it into a module ({_one_line(e)})") from None
    module.train = types.MethodType(_fixed_mode_train, module)
    module.eval = types.MethodType(lambda self: _fixed_mode_train(self, False), module)
    names: list[str] | None = None
    if init not in INIT_MODES:
        sd, outer, path = _read_state_dict(init, "init file", spec.text)  # weights (and their sha) from the checkpoint
        _check_and_load(module, sd, what="init file", path=path, spec_text=spec.text, head=None, want=None)
    size, mean, std = _resolve_meta(spec, recorded, None, None)
    n = _torchscript_classes(module, spec, size, kind="ExportedProgram")
    if init not in INIT_MODES:
        names = _class_names(outer, n, path)
    if num_classes is not None and int(num_classes) != n:
        raise _class_mismatch(spec, n, int(num_classes))
    return LoadedModel(spec, module, n, size, mean, std, file_sha256(path), names, False, path)
