"""The validation protocol of `evaluate` and `distill --val`: how an image becomes the model's S x S input.

One rule: S is the crop size (the checkpoint's training size unless ``--image-size``); the shorter side
is resized to ``--resize-size`` if given, else to round(S / ``--crop-pct``) (0.875 by default: 224 -> 256),
with ``--interpolation`` (bilinear by default, antialiased when shrinking), then the centre S x S is cut.
torchvision's V2 weights: ``--resize-size 232`` at S = 224 (bilinear); timm models: their crop_pct and
``--interpolation bicubic`` (timm rounds S / crop_pct down: where that differs from round(), e.g.
224 / 0.95 = 235.8, give timm's ``--resize-size 235`` to match it to the pixel).

Kept free of torch and DALI imports, so the commands' ``--help`` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mealkd.errors import UserError

DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bilinear"
INTERPOLATIONS = ("bilinear", "bicubic")  # core.replay.EVAL_INTERPOLATIONS maps them to DALI's filters

#: one sentence per flag, shared by `evaluate` and `distill --val` (their --help)
PROTOCOL_HELP = {
    "resize_size": "Validation: resize the shorter side to this many pixels, then centre-crop S (S = the crop size); "
                   "e.g. 232 with S = 224 for torchvision's V2 weights. Default: round(S / --crop-pct).",
    "crop_pct": "Validation: the centre crop's share of the resized shorter side, when --resize-size is not given: "
                "resize to round(S / crop_pct) (e.g. timm's per-model crop_pct, 0.95; timm rounds down: "
                "--resize-size matches it exactly where that differs), then crop S. "
                f"Default {DEFAULT_CROP_PCT} (224 -> 256).",
    "interpolation": "Validation resize filter, antialiased when shrinking: 'bilinear' (torchvision's weights) or "
                     f"'bicubic' (most timm models). Default {DEFAULT_INTERPOLATION}.",
}


@dataclass(frozen=True)
class EvalProtocol:
    """How a validation image becomes the model's S x S input (S: the crop size, given separately):
    resize the shorter side to ``resize_size``, else to round(S / ``crop_pct``), with ``interpolation``
    (antialiased), then cut the centre S x S. The default (0.875, bilinear) is mealkd's long-standing one."""

    resize_size: int | None = None
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = DEFAULT_INTERPOLATION

    @classmethod
    def from_flags(cls, resize_size: int | None = None, crop_pct: float | None = None,
                   interpolation: str | None = None) -> "EvalProtocol":
        """From the ``--resize-size``/``--crop-pct``/``--interpolation`` values (None: not given).
        UserError (one line naming the flag) on a bad value or on both --resize-size and --crop-pct."""
        if resize_size is not None and crop_pct is not None:
            raise UserError(f"--resize-size {resize_size} and --crop-pct {crop_pct}: give one of them "
                            "(--resize-size fixes the resized shorter side; --crop-pct derives it from the crop size)")
        if resize_size is not None and (isinstance(resize_size, bool) or int(resize_size) != resize_size or resize_size < 1):
            raise UserError(f"--resize-size {resize_size}: must be a positive number of pixels (e.g. 232)")
        if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
            raise UserError(f"--crop-pct {crop_pct}: must be in (0, 1], e.g. 0.875 or 0.95")
        interpolation = DEFAULT_INTERPOLATION if interpolation is None else str(interpolation).lower()
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"--interpolation {interpolation}: must be one of {', '.join(INTERPOLATIONS)}")
        return cls(None if resize_size is None else int(resize_size),
                   DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct), interpolation)

    def resize_for(self, size: int) -> int:
        """The resized shorter side for crop size ``size`` (the rule's one home: core.replay.eval_resize_shorter)."""
        from mealkd.core.replay import eval_resize_shorter

        return eval_resize_shorter(size, self.crop_pct, self.resize_size)

    def check(self, size: int) -> None:
        """UserError if the resized shorter side would be smaller than the crop."""
        shorter = self.resize_for(size)
        if shorter < size:
            flag = f"--resize-size {self.resize_size}" if self.resize_size is not None else f"--crop-pct {self.crop_pct}"
            raise UserError(f"{flag}: resizes the shorter side to {shorter} px, less than the {size} px crop; "
                            f"give a resize size of at least {size}")

    def describe(self, size: int) -> dict:
        """JSON-able record: crop size, resized shorter side and the protocol's fields."""
        return {"crop_size": int(size), "resize_shorter": self.resize_for(size), **asdict(self)}
