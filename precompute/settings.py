"""The settings a label store records that a run adding crops to it must reproduce (a resumed
``precompute``, ``extend``), compared by what they mean and told as the flags that set them.

Before, a resumed run compared the recorded JSON verbatim and named internal keys: the same teacher
named by another path (a job resumed from another directory or mount), ``:w=1`` written out, or
``TOPK:3`` for ``topk:3`` were refused as "different settings (teachers)", with "delete it to start
over" as the only advice. Teachers are now matched by what decides their outputs (architecture,
weights sha256, input size, mean/std, weight; in any order), not by the spec text.
"""
from __future__ import annotations

import json
from typing import Any

from mealkd import storage
from mealkd.errors import UserError

#: the settings a continued run must reproduce (the decoder is judged by precompute.decoder_drift,
#: which accepts a different GPU or library version with --allow-decoder-mismatch)
SETTINGS_KEYS = ("class_names", "crop", "teachers", "temperature", "precision", "dataset", "encoding_request")

#: what makes two teacher records the same teacher: everything that decides its outputs, not how it was
#: named (spec text, file path)
TEACHER_IDENTITY = ("source", "arch", "weights_sha256", "num_classes", "input_size", "mean", "std", "weight")

#: crop policy field -> the precompute flag that sets it
CROP_FLAGS = {"image_size": "--image-size", "scale": "--scale", "ratio": "--ratio", "flip_prob": "--flip-prob", "seed": "--seed"}


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from a store's JSON attributes."""
    return json.loads(json.dumps(value))


def _identity(teacher: dict) -> str:
    return json.dumps([jsonable(teacher.get(key)) for key in TEACHER_IDENTITY])


def teacher_differences(stored: list[dict], given: list[dict]) -> list[str]:
    """How the ``given`` teachers (``TeacherEnsemble.describe()``) differ from a store's ``stored`` ones,
    one phrase per teacher ([] when they are the same teachers, in any order)."""
    if len(stored) != len(given):
        return [f"{len(given)} teacher(s) given, the store has {len(stored)} ({', '.join(str(t.get('spec')) for t in stored)})"]
    if sorted(map(_identity, stored)) == sorted(map(_identity, given)):
        return []
    phrases = []
    for i, (have, want) in enumerate(zip(stored, given), 1):
        fields = [key for key in TEACHER_IDENTITY if jsonable(have.get(key)) != jsonable(want.get(key))]
        if fields:
            detail = ", ".join(f"{key} {_short(want.get(key))} (the store: {_short(have.get(key))})" for key in fields)
            phrases.append(f"teacher {i} {want.get('spec')}: {detail}")
    return phrases


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if isinstance(value, str) and len(text) == 64 else text  # a sha256


def _encoding(text: Any) -> Any:
    try:
        return storage.parse_encoding(str(text))
    except Exception:  # noqa: BLE001 - an unparsable record is compared as it is
        return text


def settings_differences(stored: dict, wanted: dict, keys: tuple[str, ...] = SETTINGS_KEYS) -> list[str]:
    """How the settings a run would record (``wanted``) differ from a store's attributes (``stored``) in
    ``keys``, one phrase each, naming the flag and both values ([] when they agree)."""
    phrases: list[str] = []
    for key in keys:
        have, want = jsonable(stored.get(key)), jsonable(wanted.get(key))
        if key == "teachers":
            phrases += [f"--teachers: {p}" for p in teacher_differences(have or [], want or [])]
        elif key == "encoding_request":
            if _encoding(have) != _encoding(want):
                phrases.append(f"--encoding {want} (the store: {have})")
        elif have == want:
            continue
        elif key == "crop":
            have, want = have or {}, want or {}
            for field, flag in CROP_FLAGS.items():
                if have.get(field) != want.get(field):
                    phrases.append(f"{flag} {_value(want.get(field))} (the store: {_value(have.get(field))})")
        elif key in ("class_names", "dataset"):
            if not any(p.startswith("--data") for p in phrases):
                phrases.append("--data: not the images the store was made from (files or classes added, removed or changed)")
        elif key == "crops_per_image":
            phrases.append(f"--crops-per-image {want} (the store: {have}; `mealkd extend` grows a finished store)")
        elif key == "precision":
            phrases.append(f"--precision: the teachers would run in {want} (the store: {have})")
        else:
            phrases.append(f"--{key.replace('_', '-')} {want} (the store: {have})")
    return phrases


def shard_size_difference(requested: int | None, recorded: int) -> list[str]:
    """``--images-per-shard`` given with another value than the store's, as a phrase ([] when it is left out,
    which keeps the store's, or equal): precompute, extend, merge and import-fkd refuse such a rerun."""
    return [] if requested is None or int(requested) == int(recorded) else [f"--images-per-shard {requested} (the store: {recorded})"]


def other_settings(out: str, what: str, phrases: list[str]) -> UserError:
    """The refusal of a rerun whose ``--out`` holds ``what`` (e.g. "this merge, begun with other settings"),
    the differences named by ``phrases``."""
    return UserError(f"--out {out}: {what} is already there ({'; '.join(phrases)}); rerun with the store's values, "
                     "use another --out, or delete it to start over")


def _value(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
