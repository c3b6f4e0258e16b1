"""Which decoder labels the crops a run adds to an existing store (``precompute`` continued, ``extend``).

Every crop of a store should be decoded as stage two will replay it, so a run that adds crops decodes
at the hardware-decoder load the store records (never the current default) and compares the rest of
its decoder with the store's ``decoder`` record:

* another backend (CPU vs nvJPEG) decodes visibly different pixels: refused, naming the ``--device``
  that matches the store;
* any other difference (GPU model, DALI / nvImageCodec / CUDA versions: a job resumed on other nodes
  or in an updated container) may change pixels by a grey level here and there: refused unless the
  user passes ``--allow-decoder-mismatch``, and then recorded in the store's ``decoder_drift`` list
  (``mealkd inspect`` shows it). Before this, such a run was told to delete the store and start over.
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from mealkd import storage
from mealkd.core.dali_io import Backend, decoder_differences, decoder_record
from mealkd.core.replay import recorded_hw_load
from mealkd.errors import UserError
from mealkd.precompute.lock import writing_store

__all__ = ["ContinuedDecoder", "continued_decoder", "record_drift"]

ALLOW_FLAG = "--allow-decoder-mismatch"


@dataclass(frozen=True)
class ContinuedDecoder:
    """How a run decodes the crops it adds: the store's recorded load, and the drift entry to record
    (None when this decoder is the store's)."""

    hw_load: float
    drift: dict | None


def continued_decoder(stored: dict | None, backend: Backend, *, allow: bool, where: str, command: str) -> ContinuedDecoder:
    """The decoder a run on ``backend`` adds crops with to a store whose ``decoder`` record is ``stored``;
    ``where`` names the store in errors (e.g. ``--out PATH``), ``command`` goes into the drift entry."""
    hw_load = recorded_hw_load(stored)
    current = decoder_record(backend, hw_load)
    differing = decoder_differences(stored, current)
    if not differing:
        return ContinuedDecoder(hw_load, None)
    stored = stored or {}
    if differing[0] == "backend":
        device = "cpu" if stored.get("backend") == "cpu" else "cuda"
        raise UserError(
            f"{where}: its crops were decoded by the {stored.get('backend')!r} JPEG decoder but this run decodes with "
            f"{current['backend']!r}: new crops would be labelled on other pixels than the stored ones; rerun with --device {device}"
        )
    detail = ", ".join(f"{key} {stored.get(key)!r} in the store vs {current.get(key)!r} here" for key in differing)
    if not allow:
        raise UserError(
            f"{where}: its crops were decoded by another {current['backend']!r} decoder ({detail}), so new crops may differ "
            f"from the stored ones by a grey level here and there; run where the store was made, or pass {ALLOW_FLAG} to "
            "continue (the store then records this decoder in its decoder_drift list)"
        )
    return ContinuedDecoder(hw_load, {"decoder": current, "fields": differing, "command": command})


def record_drift(out: str, drift: dict, console: Console) -> None:
    """``--allow-decoder-mismatch``: list ``drift`` (from :func:`continued_decoder`) in the store at ``out``'s
    ``decoder_drift`` (the writer stamps it with the time) and say so; from one process."""
    with writing_store(out):
        storage.StoreWriter(out).record_decoder_drift(drift)
    console.print(f"[yellow]{ALLOW_FLAG}: {out}'s new crops are decoded by another decoder than its first ones "
                  f"(differing: {', '.join(drift['fields'])}); recorded in its decoder_drift", soft_wrap=True)
