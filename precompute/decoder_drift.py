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

Every rank of a job is judged, not only rank 0: a job whose nodes differ in GPU model or container
(against the store's record, or, for a store the job creates, against rank 0's) is refused or
recorded the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from rich.console import Console

from mealkd import storage
from mealkd.core.dali_io import Backend, decoder_differences, decoder_record
from mealkd.core.distributed import Dist
from mealkd.core.replay import recorded_hw_load
from mealkd.errors import UserError
from mealkd.precompute.lock import writing_store

__all__ = ["ContinuedDecoder", "job_decoder", "judge_decoders", "record_drift"]

ALLOW_FLAG = "--allow-decoder-mismatch"


@dataclass(frozen=True)
class ContinuedDecoder:
    """How a job decodes the crops it adds: the store's recorded load, and the drift entries to record
    (none when every rank's decoder is the store's)."""

    hw_load: float
    drifts: tuple[dict, ...] = ()


def job_decoder(stored: dict | None, backend: Backend, d: Dist, *, allow: bool, where: str, command: str) -> ContinuedDecoder:
    """Collective: the decoder every rank of a job on ``backend`` adds crops with, judged against the
    store's ``decoder`` record ``stored`` (None for a store the job creates: rank 0's record will be
    the store's, so the other ranks are judged against it). Every rank reaches the same verdict, so a
    refusal stops them all. ``where`` names the store in errors (e.g. ``--out PATH``); ``command`` goes
    into the drift entries."""
    return judge_decoders(stored, d.gather(decoder_record(backend, recorded_hw_load(stored))),
                          allow=allow, where=where, command=command)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def judge_decoders(stored: dict | None, records: list[dict], *, allow: bool, where: str, command: str) -> ContinuedDecoder:
    """:func:`job_decoder`'s verdict on every rank's decoder record (``records``, in rank order)."""
    hw_load = recorded_hw_load(stored)
    reference = stored if stored is not None else records[0]
    groups: dict[str, tuple[dict, list[str], list[int]]] = {}  # one per distinct differing decoder
    for rank, record in enumerate(records):
        differing = decoder_differences(reference, record)
        if differing:
            groups.setdefault(json.dumps(record, sort_keys=True, default=str), (record, differing, []))[2].append(rank)
    if not groups:
        return ContinuedDecoder(hw_load)
    current, differing, ranks = next(iter(groups.values()))
    several = len(records) > 1
    if differing[0] == "backend":
        device = "cpu" if reference.get("backend") == "cpu" else "cuda"
        raise UserError(
            f"{where}: its crops were decoded by the {reference.get('backend')!r} JPEG decoder but this run decodes with "
            f"{current['backend']!r}: new crops would be labelled on other pixels than the stored ones; rerun with --device {device}"
        )
    if not allow:
        there = f" on {_ranks(ranks)}" if several else " here"
        if stored is None:
            detail = ", ".join(f"{key} {reference.get(key)!r} on rank 0 vs {current.get(key)!r}{there}" for key in differing)
            raise UserError(
                f"{where}: the job's ranks decode with different {current['backend']!r} decoders ({detail}), so their crops may "
                f"differ by a grey level here and there; run every rank on one GPU model and container, or pass {ALLOW_FLAG} "
                "to continue (the store then records the other decoders in its decoder_drift list)"
            )
        detail = ", ".join(f"{key} {reference.get(key)!r} in the store vs {current.get(key)!r}{there}" for key in differing)
        raise UserError(
            f"{where}: its crops were decoded by another {current['backend']!r} decoder ({detail}), so new crops may differ "
            f"from the stored ones by a grey level here and there; run where the store was made, or pass {ALLOW_FLAG} to "
            "continue (the store then records this decoder in its decoder_drift list)"
        )
    drifts = tuple({"decoder": record, "fields": fields, "command": command, **({"ranks": ranks} if several else {})}
                   for record, fields, ranks in groups.values())
    return ContinuedDecoder(hw_load, drifts)


def record_drift(out: str, drifts: tuple[dict, ...], console: Console) -> None:
    """``--allow-decoder-mismatch``: list each of ``drifts`` (from :func:`job_decoder`) in the store at
    ``out``'s ``decoder_drift`` (the writer stamps it with the time) and say so; from one process."""
    with writing_store(out):
        writer = storage.StoreWriter(out)
        for drift in drifts:
            writer.record_decoder_drift(drift)
    for drift in drifts:
        by = f" on {_ranks(drift['ranks'])}" if drift.get("ranks") else ""
        console.print(f"[yellow]{ALLOW_FLAG}: {out}'s new crops are decoded{by} by another decoder than its first ones "
                      f"(differing: {', '.join(drift['fields'])}); recorded in its decoder_drift", soft_wrap=True)
