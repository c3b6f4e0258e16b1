"""``mealkd merge``: combine stores of the same crops, labelled by different teachers, into one
weighted-ensemble store (a NEW store with its own ``store_id``; the inputs are only read).

Every merged row is ``sum_i share_i * row_i``, ``row_i`` being store i's stored row as a student
would read it (dense: the fp16 row renormalised; top-k: decoded, leftover mass spread evenly).
Shares default to each store's total recorded teacher weight, so merging stores made with
``t1:w=1`` and ``t2:w=0.5`` gives what one ``precompute --teachers t1,t2:w=0.5`` gives (dense:
within fp16 rounding); ``--weights`` sets one weight per store instead. Every teacher is recorded
with its effective weight (store weight x its share of its own store's teacher weight).

Top-k: when every input is top-k, the default output keeps K = the sum of the inputs' K (capped at
C - 1): the union of the supports, so nothing an input kept is dropped; with any dense input the
default output is dense. The top-k fidelity the store records (``fidelity``
attribute, per-shard ``fidelity`` array) is the TV between the exact weighted mixture of the inputs'
decoded rows and the stored top-K row; each input's own fidelity is kept in ``merged_from``.

Refused with one line: stores of different datasets, class names, crop policy, crops per image,
temperature, decoder backend, or stored windows/flips/excluded images. Resumable like precompute:
the output is written shard by shard, ``done`` last, under the store lock; rerunning continues.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from mealkd import storage
from mealkd.console import make_console
from mealkd.core.dali_io import decoder_differences
from mealkd.core.models.spec import with_weight
from mealkd.core.progress import RateColumn, make_progress
from mealkd.precompute.lock import StoreLock, writing_store
from mealkd.precompute.settings import other_settings, shard_size_difference
from mealkd.errors import UserError
from mealkd.storage.lineage import inherited_attributes, same_location, source_record
from mealkd.storage.reader import LabelStore
from mealkd.storage.schema import DECODER_DRIFT, DENSE, TOPK, encoding_attr, parse_encoding

#: images compared at once when checking that the inputs' windows and flips agree
CHECK_BLOCK = 4096


@dataclass
class MergeConfig:
    stores: tuple[str, ...]
    out: str
    weights: str | None = None
    encoding: str | None = None
    images_per_shard: int | None = None


def _open_inputs(cfg: MergeConfig) -> list[LabelStore]:
    if len(cfg.stores) < 2:
        raise UserError("STORES: merge needs at least two label stores (mealkd merge A.zarr B.zarr ... --out C.zarr)")
    stores = []
    for url in cfg.stores:
        try:
            stores.append(storage.open_store(url, require_complete=True))
        except UserError as err:
            raise UserError(f"STORES {err}") from None
    seen: dict[str, str] = {}
    for s in stores:
        if s.store_id in seen:
            raise UserError(f"STORES: {s.url} and {seen[s.store_id]} are the same store (id {s.store_id[:12]}); "
                            "list each store once and use --weights to weight it")
        seen[s.store_id] = s.url
    return stores


def _warn_shared_teachers(stores: list[LabelStore], console: Console) -> None:
    """A teacher (same weights file) in two inputs counts twice in the mixture: allowed, but said."""
    owner: dict[str, str] = {}
    for s in stores:
        for t in s.attrs.get("teachers") or []:
            sha = t.get("weights_sha256")
            if sha and sha in owner and owner[sha] != s.url:
                console.print(f"[yellow]merge[/]: teacher {t.get('spec')} (sha256 {sha[:12]}) is in both {owner[sha]} and {s.url}; "
                              "its labels count once per store", soft_wrap=True)
            owner.setdefault(sha, s.url)


def _differences(a: LabelStore, b: LabelStore) -> str | None:
    """The first label-relevant difference between two stores' attributes, in words."""
    if (a.attrs.get("dataset") or {}).get("fingerprint") != (b.attrs.get("dataset") or {}).get("fingerprint"):
        return "a different dataset (fingerprint)"
    if a.class_names != b.class_names:
        return "different class names"
    ca, cb = a.attrs.get("crop") or {}, b.attrs.get("crop") or {}
    for key, word in (("seed", "crop seed"), ("image_size", "image size"), ("scale", "scale"), ("ratio", "ratio"),
                      ("flip_prob", "flip probability")):
        if json.dumps(ca.get(key)) != json.dumps(cb.get(key)):
            return f"{word} {cb.get(key)} (vs {ca.get(key)})"
    if a.crops_per_image != b.crops_per_image:
        return f"{b.crops_per_image} crops per image (vs {a.crops_per_image}; `mealkd extend` the smaller one first)"
    if a.temperature != b.temperature:
        return f"temperature {b.temperature:g} (vs {a.temperature:g})"
    da, db = (a.attrs.get("decoder") or {}).get("backend"), (b.attrs.get("decoder") or {}).get("backend")
    if da != db:
        return f"decoder {db} (vs {da}: the teachers saw different pixels)"
    return None


def _imported(s: LabelStore) -> bool:
    """Whether the store's crops were read from label files (import-fkd), not drawn from a seed."""
    crop = s.attrs.get("crop") or {}
    return crop.get("policy") == "imported" or crop.get("reproducible") is False


def _check_compatible(stores: list[LabelStore], console: Console) -> None:
    first = stores[0]
    imported = [s for s in stores if _imported(s)]
    if imported and len(imported) < len(stores):  # compared as attributes it read 'crop seed 0 (vs None)'
        i, p = imported[0], next(s for s in stores if not _imported(s))
        source = str((i.attrs.get("crop") or {}).get("source") or "label files").upper()
        raise UserError(f"STORES: {i.url} holds crops imported from {source} label files, {p.url} crops drawn by mealkd's seeded "
                        f"crop generator (seed {(p.attrs.get('crop') or {}).get('seed')}); imported crops cannot match seeded ones: "
                        "merge an imported store only with stores of the same imported crops")
    for s in stores[1:]:
        diff = _differences(first, s)
        if diff:
            raise UserError(f"STORES: {s.url} differs from {first.url}: {diff}; merge only stores of the same dataset and crops")
    for name in ("excluded", "sizes"):
        for s in stores[1:]:
            if not np.array_equal(getattr(s, name), getattr(first, name)):
                raise UserError(f"STORES: {s.url} has different '{name}' than {first.url}; merge only stores of the same images and crops")
    with make_progress(console, RateColumn("images")) as progress:
        task = progress.add_task("compare crops", total=first.num_images)
        for lo in range(0, first.num_images, CHECK_BLOCK):
            hi = min(first.num_images, lo + CHECK_BLOCK)
            want_w, want_f = first.block_crops(lo, hi)
            for s in stores[1:]:
                w, f = s.block_crops(lo, hi)
                bad = ~(np.all(w == want_w, axis=2) & (f == want_f))
                if bad.any():
                    i, k = (int(v) for v in np.argwhere(bad)[0])
                    raise UserError(f"STORES: {s.url} has different windows/flips than {first.url} (first at image {lo + i}, "
                                    f"crop {k}); merge only stores of the same crops")
            progress.update(task, completed=hi)


def _store_weights(cfg: MergeConfig, stores: list[LabelStore]) -> list[float]:
    if cfg.weights is None:
        weights = [sum(float(t.get("weight", 1.0)) for t in s.attrs.get("teachers") or [{}]) for s in stores]
    else:
        try:
            weights = [float(w) for w in cfg.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {cfg.weights}: not a comma list of numbers; give one positive weight per store, e.g. 1,0.5") from None
        if len(weights) != len(stores):
            raise UserError(f"--weights {cfg.weights}: {len(weights)} weight(s) for {len(stores)} stores; give one per store, in order")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"--weights {cfg.weights or weights}: every weight must be a positive number")
    if not math.isfinite(sum(weights)):  # each share is weight / sum: an infinite sum makes them 0 and every row NaN
        raise UserError(f"--weights {cfg.weights or weights}: the weights' sum overflows (inf); only their ratios matter, "
                        "so scale them down, e.g. 1,1")
    return weights


def _output_encoding(cfg: MergeConfig, stores: list[LabelStore]) -> str:
    if cfg.encoding is not None:
        kind, k = parse_encoding(cfg.encoding)
        return "dense" if kind == DENSE else f"topk:{k}"
    if any(s.topk is None for s in stores):
        return "dense"  # a dense input's support is every class: only dense keeps the union
    return f"topk:{min(stores[0].num_classes - 1, sum(s.topk for s in stores))}"


def _effective_teachers(stores: list[LabelStore], weights: list[float]) -> list[dict]:
    out = []
    for s, w in zip(stores, weights):
        teachers = s.attrs.get("teachers") or []
        total = sum(float(t.get("weight", 1.0)) for t in teachers) or 1.0
        for t in teachers:
            weight = w * (float(t.get("weight", 1.0)) / total)  # the share first: a huge --weights times a weight > 1 is not inf
            # the spec with its weight in the merged ensemble: the store's recorded specs rebuild that ensemble
            out.append(dict(t, weight=weight, spec=with_weight(t["spec"], weight) if t.get("spec") else t.get("spec")))
    return out


def plan_attributes(cfg: MergeConfig, stores: list[LabelStore], weights: list[float], encoding: str) -> dict:
    """The merged store's attributes (besides those create_store adds)."""
    first = stores[0]
    attributes = inherited_attributes(first.attrs)
    precisions = {s.attrs.get("precision") for s in stores}
    attributes.update(
        teachers=_effective_teachers(stores, weights),
        precision=precisions.pop() if len(precisions) == 1 else "mixed",
        encoding_request=encoding,
        fidelity_reference="the weighted mixture of the merged stores' decoded rows",
        merged_from=[
            source_record(s.attrs, url, weight=w, share=w / sum(weights), teachers=s.attrs.get("teachers") or [],
                          label_encoding=s.attrs.get("label_encoding"), fidelity=s.attrs.get("fidelity"),
                          precision=s.attrs.get("precision"), decoder=s.attrs.get("decoder"))
            for s, url, w in zip(stores, cfg.stores, weights)
        ],
    )
    drift = _merged_drift(stores)
    if drift:
        attributes[DECODER_DRIFT] = drift
    return json.loads(json.dumps(attributes))


def _merged_drift(stores: list[LabelStore]) -> list[dict]:
    """The merged store's decoder_drift: every input's, plus the decoder of each input that differs from the
    first input's (same backend, another GPU or library version: its teachers saw those pixels)."""
    first = stores[0].attrs.get("decoder")
    entries = [entry for s in stores for entry in s.attrs.get(DECODER_DRIFT) or []]
    for s in stores[1:]:
        fields = decoder_differences(first, s.attrs.get("decoder") or {})
        if fields:
            entries.append({"decoder": s.attrs.get("decoder"), "fields": fields, "command": f"merge of {s.url}", "at": s.attrs.get("created")})
    unique: list[dict] = []
    for entry in entries:
        if entry.get("decoder") != first and all(entry.get("decoder") != kept.get("decoder") for kept in unique):
            unique.append(entry)
    return unique


def _is_this_merge(out: LabelStore, stores: list[LabelStore], weights: list[float], encoding: str) -> bool:
    recorded = [(m.get("store_id"), m.get("weight")) for m in out.attrs.get("merged_from") or []]
    kind, k = parse_encoding(encoding)
    return (recorded == [(s.store_id, w) for s, w in zip(stores, weights)]
            and out.attrs.get("label_encoding") == encoding_attr(kind, k))


def _mixture(stores: list[LabelStore], shares: list[float], start: int, stop: int) -> np.ndarray:
    """float32 (n, R, C): the weighted mixture of the inputs' decoded rows; excluded images uniform."""
    out = None
    for s, share in zip(stores, shares):
        rows = s.block_labels(start, stop)
        rows *= np.float32(share)
        if out is None:
            out = rows
        else:
            out += rows
    excluded = stores[0].excluded[start:stop]
    out[excluded] = np.float32(1.0 / out.shape[-1])
    out /= out.sum(axis=-1, keepdims=True)  # float32 rounding of the weighted sum, back to exactly-normalised rows
    return out


def run_merge(cfg: MergeConfig, console: Console | None = None) -> dict:
    """Merge (or continue merging) ``cfg.stores`` into ``cfg.out``."""
    console = console or make_console()
    if any(same_location(u, cfg.out) for u in cfg.stores):
        raise UserError(f"--out {cfg.out}: is one of the input stores; merge writes a new store, choose another --out")
    storage.check_output(cfg.out)
    stores = _open_inputs(cfg)
    weights = _store_weights(cfg, stores)
    encoding = _output_encoding(cfg, stores)
    if cfg.images_per_shard is not None and cfg.images_per_shard < 1:
        raise UserError(f"--images-per-shard {cfg.images_per_shard}: must be >= 1")
    first = stores[0]
    with StoreLock(cfg.out):
        if storage.store_exists(cfg.out):
            out = storage.open_store(cfg.out, require_complete=False)
            if not _is_this_merge(out, stores, weights, encoding):
                raise UserError(f"--out {cfg.out}: a different label store is already there (not this merge of these stores "
                                "with these weights and encoding); choose another --out or delete it")
            differing = shard_size_difference(cfg.images_per_shard, out.images_per_shard)
            if differing:
                raise other_settings(cfg.out, "this merge, begun with other settings", differing)
        else:
            _check_compatible(stores, console)
            _warn_shared_teachers(stores, console)
            attributes = plan_attributes(cfg, stores, weights, encoding)
            with writing_store(cfg.out, "the merged store"):
                storage.create_store(cfg.out, attributes=attributes, paths=first.paths, targets=first.targets, sizes=first.sizes,
                                     crops_per_image=first.crops_per_image, num_classes=first.num_classes, encoding=encoding,
                                     excluded=first.excluded, images_per_shard=cfg.images_per_shard)
        summary = _merge_pending(cfg, stores, weights, console)
        with writing_store(cfg.out, "the merged store"):
            summary["complete"] = storage.StoreWriter(cfg.out).finalize()
    return summary


def _merge_pending(cfg: MergeConfig, stores: list[LabelStore], weights: list[float], console: Console) -> dict:
    writer = storage.StoreWriter(cfg.out)
    shares = [w / sum(weights) for w in weights]
    pending = writer.pending_shards()
    total = writer.images_in(pending)
    done = 0
    with make_progress(console, RateColumn("images")) as progress:
        task = progress.add_task("merge", total=total)
        for shard in pending:
            start, stop = writer.shard_range(shard)
            windows, flips = stores[0].block_crops(start, stop)
            probs = _mixture(stores, shares, start, stop)
            with writing_store(cfg.out, "the merged store"):
                writer.write_shard(shard, windows, flips, probs)
            done += stop - start
            progress.update(task, completed=done)
    return {"shards_written": len(pending), "images": total, "encoding": writer.kind if writer.kind == DENSE else f"{TOPK}:{writer.k}"}
