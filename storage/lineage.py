"""Provenance of derived label stores (``mealkd extend`` / ``mealkd merge``).

A derived store is a NEW store (new ``store_id``): a distill run trained on its source refuses to
``--resume`` on it. It records where its labels came from:

* ``extended_from``: ``{store_id, path, crops_per_image, created}`` of the store it grew from;
* ``merged_from``: one such record per input store, plus its ``teachers``, store ``weight`` and
  ``share`` (weight / sum of weights), ``label_encoding``, ``fidelity`` (top-k), ``precision``.

A record nests its source's own ``extended_from`` / ``merged_from``, so the whole history of a store
is a tree under these two keys (``mealkd inspect`` shows it).
"""
from __future__ import annotations

from typing import Any

from mealkd.storage.schema import RESERVED_ATTRS, is_local, local_path

LINEAGE_KEYS = ("extended_from", "merged_from")

#: attributes a derived store never copies from its source: create_store's own, those finalize
#: writes, and the source's lineage (nested into the new record instead)
NOT_INHERITED = (*RESERVED_ATTRS, "completed", "fidelity", "fidelity_reference", *LINEAGE_KEYS)


def _count(value: Any) -> int:
    """A count recorded as a number (import-fkd writes counts), or as a list of what was counted."""
    return len(value) if isinstance(value, (list, tuple)) else int(value or 0)


def writing_command(attrs: dict) -> str:
    """The command that wrote (and, rerun with the same arguments, finishes or rewrites) a store with
    these attributes: what incomplete or repaired stores tell the user to rerun."""
    if attrs.get("extended_from"):
        return "mealkd extend"
    if attrs.get("merged_from"):
        return "mealkd merge"
    if attrs.get("imported"):
        return "mealkd import-fkd"
    return "mealkd precompute"


def same_location(a: str, b: str) -> bool:
    """True if two store URLs name the same place (local paths resolved)."""
    if is_local(a) and is_local(b):
        return local_path(a).resolve() == local_path(b).resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")


def inherited_attributes(attrs: dict) -> dict:
    """The source's attributes a derived store keeps (settings, dataset, decoder, ...)."""
    return {k: v for k, v in attrs.items() if k not in NOT_INHERITED}


def source_record(attrs: dict, path: str, **extra: Any) -> dict:
    """The provenance record of one source store, with its own lineage nested."""
    record: dict[str, Any] = {
        "store_id": attrs.get("store_id"),
        "path": str(path),
        "created": attrs.get("created"),
        "crops_per_image": attrs.get("crops_per_image"),
    }
    record.update(extra)
    for key in LINEAGE_KEYS:
        if attrs.get(key):
            record[key] = attrs[key]
    return record


def describe_lineage(attrs: dict) -> list[str]:
    """Human lines for ``mealkd inspect``: one per ancestor, indented by depth."""
    lines: list[str] = []

    def walk(node: dict, depth: int) -> None:
        pad = "  " * depth
        imp = node.get("imported")
        if imp:
            skipped = imp.get("excluded") or {}
            lines.append(f"{pad}imported from {imp.get('format', '?').upper()} labels at {imp.get('label_dir')}: "
                         f"{imp.get('crops_per_image')} crops/image, top-{imp.get('topk')} ({imp.get('label_dtype')}), "
                         f"{imp.get('clamped_windows', 0)} window(s) clamped at the border, "
                         f"{_count(skipped.get('bad_label_files'))} bad label file(s) and "
                         f"{_count(skipped.get('unreadable_images'))} unreadable image(s) excluded; crops not reproducible")
        ext = node.get("extended_from")
        if ext:
            lines.append(f"{pad}extended from {str(ext.get('store_id'))[:12]} ({ext.get('crops_per_image')} crops/image) at {ext.get('path')}")
            walk(ext, depth + 1)
        for src in node.get("merged_from") or []:
            teachers = ", ".join(str(t.get("spec")) for t in src.get("teachers") or [])
            enc = src.get("label_encoding") or {}
            enc_text = enc.get("kind", "?") + (f":{enc['k']}" if enc.get("k") else "")
            fid = src.get("fidelity")
            fid_text = f", its top-k mean TV {fid['mean_tv']:.4f}" if fid else ""
            lines.append(f"{pad}merged from {str(src.get('store_id'))[:12]} at {src.get('path')}: weight {src.get('weight'):g} "
                         f"(share {src.get('share', 0):.4f}), {enc_text}{fid_text}, teachers {teachers}")
            walk(src, depth + 1)

    walk(attrs, 0)
    return lines


def teacher_tv_bound(node: dict, stat: str = "mean_tv") -> float | None:
    """Upper bound on the mean (``stat="max_tv"``: per-crop) total variation between a store's decoded
    rows and its teachers' exact (dense, float) ensemble rows: its own measured top-k loss plus, for a
    merged store, each input's bound weighted by its share (triangle inequality; TV is convex in a
    mixture). None if no step of its history lost anything (dense all the way; fp16 rounding aside)."""
    kind = (node.get("label_encoding") or {}).get("kind")
    fid = node.get("fidelity") or {}
    own = float(fid.get(stat, 0.0)) if kind == "topk" else 0.0
    inputs = [(float(src.get("share", 0.0)), teacher_tv_bound(src, stat)) for src in node.get("merged_from") or []]
    total = own + sum(share * (bound or 0.0) for share, bound in inputs)
    lossy = kind == "topk" or any(bound is not None for _, bound in inputs)
    return total if lossy else None
