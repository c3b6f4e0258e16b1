"""The model-spec grammar (see the package docstring): parse ``--teachers`` / ``--student`` text into a ModelSpec."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from mealkd.core.windows import MAX_IMAGE_SIZE
from mealkd.errors import UserError




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
        if not re.fullmatch(r"\d+", value.strip()) or not 0 < int(value) <= MAX_IMAGE_SIZE:
            raise _bad(text, f"size= needs a number of pixels from 1 to {MAX_IMAGE_SIZE}, got {value!r}")
        return "size", int(value)
    if key in ("mean", "std"):
        return key, _parse_triple(text, key, value)
    raise _bad(text, f"unknown option {key!r} (valid: w, size, mean, std)")


def rest_is_pt2(path: str) -> bool:
    """Whether a bare spec names an ExportedProgram file (``.pt2``)."""
    return path.lower().endswith(_EXPORT_SUFFIXES)


def _split_options(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the spec before its options, its ``(key, value)`` options in order). Options are the trailing
    ``:key=value`` segments; the first segment is never an option."""
    parts = text.split(":")
    options: list[tuple[str, str]] = []
    while len(parts) > 1 and _OPTION_RE.match(parts[-1]):
        options.insert(0, _OPTION_RE.match(parts.pop()).groups())  # type: ignore[union-attr]
    return ":".join(parts), options


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
    body, options = _split_options(raw)
    opts: dict[str, Any] = {}
    for key, value in reversed(options):  # last first, as they were always read
        name, parsed = _parse_option(raw, key, value)
        if name in opts:
            raise _bad(raw, f"option {key!r} given twice")
        opts[name] = parsed
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


def with_weight(text: str, weight: float) -> str:
    """``text`` with its ``:w=`` option set to ``weight`` (its other options and their order kept): the spec
    of a teacher whose weight in an ensemble changed (``mealkd merge --weights``), which rebuilds that
    ensemble when given back (``extend``, ``verify`` use a store's recorded specs). A recorded teacher that
    is not a model spec (``imported:fkd``) is returned as it is."""
    try:
        spec = parse_spec(text)
    except UserError:
        return text
    if spec.weight == float(weight):
        return spec.text
    body, options = _split_options(spec.text)
    return ":".join([body, *(f"{key}={value}" for key, value in options if key != "w"), f"w={float(weight)!r}"])


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
