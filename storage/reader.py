"""Opening a label store for reading: validation against the dataset and label lookups.

Read paths (see docs/architecture.md, section 6.7: zarr random single-row reads are slow, contiguous reads fast):

* ``LabelStore.slot_encoded(slot, image_ids)`` - the training read (stage two's loader, once per epoch):
  crop slot ``slot`` for many images, as stored (compact), decoded in small batches later with
  ``decode``; every touched inner chunk ``(chunk_images, 1, C)`` is read and decoded once, in image
  order, and rows are returned in the order asked for. ``slot_labels`` is the same, decoded at once.
* ``LabelStore.labels(image_ids, crop_ids)`` / ``encoded`` - random access; ids are grouped by inner
  chunk (image block, crop slot), every touched chunk read once per call.

* ``LabelStore.slot_crops(slot, image_ids)`` - the windows and flips of one crop slot (stage two's
  per-epoch read). Their inner chunks are one crop slot of a whole shard (``storage.schema``), so
  zarr fetches each touched shard's index and that slot's inner chunk only: ~1/R of the arrays.
  Stores made before that layout (one plain chunk per shard) read the same rows, fetching whole
  shards. ``LabelStore.crops`` groups random (image, crop) pairs by slot the same way.

The label reads go through :mod:`storage.rawshard` (one ``pread`` + Blosc decode per inner chunk, shard
indexes cached) when the store is local and complete: ~7x zarr's speed for random lookups, ~2x for
slot reads (docs/benchmarks.md). Otherwise (fsspec URLs, incomplete stores being written, or
``fast_path = False``) they use zarr: one orthogonal selection per crop slot, run concurrently in
zarr's event loop. The raw path also holds no event loop or open files, so a LabelStore used in a
forked worker process keeps working there.
"""
from __future__ import annotations

import asyncio
import unicodedata
from functools import cached_property
from typing import Sequence

import numpy as np

from mealkd.storage import remote
from mealkd.storage.encoding import decode_topk, normalise_rows
from mealkd.storage.lineage import writing_command
from mealkd.errors import UserError
from mealkd.storage.damage import beyond_repair, damaged, member
from mealkd.storage.schema import CREATE_TIME_ARRAYS, DENSE, FORMAT, encoding_from_attr, is_local, label_array_names, local_path, open_group, shard_file_key, zarr_store


def store_exists(url: str) -> bool:
    """True if a mealkd store (a Zarr group with the format attribute) exists at ``url``."""
    try:
        _, attrs = open_group(str(url), read_only=True)
    except UserError:
        return False
    return attrs.get("format") == FORMAT


def refuse_other_dataset(store: "LabelStore", fingerprint: str, dataset_paths: Sequence[str] | None = None,
                         data: str | None = None) -> None:
    """The one refusal of a dataset (``--data`` ``data``) whose fingerprint is not the store's, for every
    command that reads a store with its images (distill, extend, verify); ``dataset_paths`` lets it name what differs."""
    have = (store.attrs.get("dataset") or {}).get("fingerprint")
    if have == fingerprint:
        return
    if dataset_paths is not None:  # only files the store excluded are gone: what deleting them after --skip-bad leaves
        stored, found = set(store.paths), set(dataset_paths)
        gone = stored - found
        if gone and found <= stored and gone <= {store.paths[i] for i in np.flatnonzero(store.excluded)}:
            raise UserError(
                f"{f'--data {data}' if data else 'the dataset'}: {len(gone):,} file(s) that {store.url} excluded as unreadable are gone "
                f"(e.g. {sorted(gone)[0]!r}); the store's image ids count them, so put them back unchanged (their content is never "
                f"read), or rerun `mealkd precompute` on the tree as it is now")
    detail = "" if dataset_paths is None else f": {dataset_difference(store.paths, dataset_paths)}"
    raise UserError(
        f"{f'--data {data}' if data else 'the dataset'}: not the dataset {store.url} was made from (fingerprint "
        f"{str(fingerprint)[:12]} here, {str(have)[:12]} in the store: files added, removed or changed since precompute{detail}); "
        f"pass the --data tree precompute used, unchanged, or rerun `mealkd precompute`"
    )


def dataset_difference(stored: Sequence[str], found: Sequence[str]) -> str:
    """What differs between a store's image paths and a dataset's whose fingerprint is not the store's,
    for the refusal: the first file only one side has (and how many), a hint when the names differ only
    in Unicode normalisation (a copy made on macOS writes NFD), else that the same files changed size."""
    have, seen = set(stored), set(found)
    gone = [p for p in stored if p not in seen]
    new = [p for p in found if p not in have]
    parts = []
    if gone:
        parts.append(f"{gone[0]!r} of the store is not in the dataset" + (f" ({len(gone):,} such files)" if len(gone) > 1 else ""))
    if new:
        parts.append(f"{new[0]!r} is not in the store" + (f" ({len(new):,} such files)" if len(new) > 1 else ""))
    if gone and new and unicodedata.normalize("NFC", gone[0]) == unicodedata.normalize("NFC", new[0]):
        parts.append("the names differ only in Unicode normalisation (a copy made on macOS?): rename to the store's form (NFC)")
    return "; ".join(parts) or "the same files, but some changed size"


def open_store(url: str, *, require_complete: bool = True, fingerprint: str | None = None,
               class_names: Sequence[str] | None = None, check_files: bool = True,
               dataset_paths: Sequence[str] | None = None, data: str | None = None) -> "LabelStore":
    """Open and validate a label store; one-line UserError for: not a mealkd store, unknown/newer
    version, incomplete (when ``require_complete``), dataset fingerprint mismatch (naming what differs
    when ``dataset_paths``, the dataset's image paths, are given, and ``data``, its --data), class-name mismatch, and
    (``check_files``) a done shard whose chunk file is missing (zarr would silently read fill values,
    i.e. all-zero labels, in its place). Unreadable chunks and all-zero label rows of done images are
    refused later, when read (see ``LabelStore.damaged``)."""
    url = str(url)
    group, attrs = open_group(url, read_only=True)
    store = LabelStore(url, group, attrs)
    if fingerprint is not None:
        refuse_other_dataset(store, fingerprint, dataset_paths, data)
    if class_names is not None:
        want, have = [str(x) for x in class_names], store.class_names
        if want != have:
            if len(want) != len(have):
                detail = f"{len(have)} classes in the store vs {len(want)} in the dataset"
            else:
                i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
                detail = f"class {i} is {have[i]!r} in the store but {want[i]!r} in the dataset"
            raise UserError(f"{url}: class names differ ({detail}); use the dataset the store was made from")
    if require_complete:
        done = store._reading(lambda: store.done)
        if not done.all():
            raise UserError(
                f"{url}: label store incomplete ({int(done.sum())}/{done.size} images done); "
                f"rerun `{writing_command(store.attrs)}` with the same arguments to finish it"
            )
    if check_files:
        missing = store._reading(store.missing_chunks)
        if missing:
            name, shard = missing[0]
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise store.damaged(f"shard {shard} of '{name}' is marked done but its file is missing{more}")
    return store


#: rows checked at once for all-zero labels (bounds the check's temporary to ROW_CHECK_BLOCK x classes bytes)
ROW_CHECK_BLOCK = 65536


class LabelStore:
    """A validated, read-only label store. Small per-image arrays load lazily, once."""

    def __init__(self, url: str, group, attrs: dict):
        self.url = url
        self._group = group
        self.attrs = attrs
        self.num_classes = int(attrs["num_classes"])
        self.crops_per_image = int(attrs["crops_per_image"])
        self.images_per_shard = int(attrs["images_per_shard"])
        try:
            self.encoding, self.topk = encoding_from_attr(attrs["label_encoding"])
        except (UserError, ValueError, KeyError):
            raise UserError(f"{url}: unknown label_encoding {attrs.get('label_encoding')!r}; recreate the store with `mealkd precompute`") from None
        self._label_arrays = [self._member(name) for name in label_array_names(self.encoding)]
        self.num_images = int(self._label_arrays[0].shape[0])
        names = attrs.get("class_names")
        self.class_names = [str(x) for x in names] if names is not None else [str(i) for i in range(self.num_classes)]

    @property
    def store_id(self) -> str:
        """This store's identity (``store_id`` attribute, a UUID written at creation). Stores made
        before the attribute existed fall back to their creation time + dataset fingerprint."""
        recorded = self.attrs.get("store_id")
        if recorded:
            return str(recorded)
        return f"created-{self.attrs.get('created')}-{str((self.attrs.get('dataset') or {}).get('fingerprint'))[:16]}"

    @property
    def temperature(self) -> float:
        """The softmax temperature T the stored rows were made at (softmax(z / T)); 1 if unrecorded."""
        return float(self.attrs.get("temperature") or 1.0)

    def __repr__(self) -> str:
        return (f"LabelStore({self.url!r}, images={self.num_images}, crops={self.crops_per_image}, "
                f"classes={self.num_classes}, encoding={self.encoding}{'' if self.topk is None else ':' + str(self.topk)})")

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.images_per_shard)

    # ------------------------------------------------------------------ damage
    def damaged(self, detail: str) -> UserError:
        """Damage a rerun mends (``storage.damage``)."""
        return damaged(self.url, self.attrs, detail)

    def _member(self, name: str):
        return member(self._group, name, self.url, self.attrs)

    def _reading(self, thunk, *, created: bool = False):
        """Run a chunk read; a torn/zeroed/truncated chunk file (zarr/Blosc raise OSError, ValueError,
        RuntimeError, MemoryError, ...) becomes a one-line UserError instead of a traceback: damage a
        rerun mends, or, for an array written when the store was ``created``, damage none does. On a
        remote store a network or credential failure says so (the store is not called damaged, and
        nobody is sent to `verify --repair` a healthy store because a connection dropped)."""
        try:
            return thunk()
        except UserError:
            raise
        except Exception as err:
            if not is_local(self.url) and remote.is_transport_error(err):
                raise remote.translate(self.url, err) from None
            if isinstance(err, (OSError, MemoryError, ValueError, RuntimeError, EOFError, TypeError)):
                detail = f"a chunk file cannot be decoded: {type(err).__name__}: {str(err)[:120]}"
                raise (beyond_repair if created else damaged)(self.url, self.attrs, detail) from None
            raise

    def created_array(self, name: str) -> np.ndarray:
        """One of the per-image arrays written when the store was created (``CREATE_TIME_ARRAYS``), whole."""
        assert name in CREATE_TIME_ARRAYS, name
        return self._reading(lambda: np.asarray(self._member(name)[:]), created=True)

    def required_chunks(self) -> list[tuple[str, int]]:
        """(array name, shard) of every file a writer must have left for the done shards: the label
        array(s), windows (if the shard has a usable image) and flips (if flips are drawn at all).
        One file per array and shard in either windows/flips layout (a shard file, or in older
        stores a plain chunk as big as the shard)."""
        done, excluded = self.done, self.excluded
        ips = self.images_per_shard
        flip_prob = (self.attrs.get("crop") or {}).get("flip_prob", 1.0)
        out = []
        for shard in range(self.num_shards):
            lo, hi = shard * ips, min((shard + 1) * ips, self.num_images)
            if not done[lo:hi].all():
                continue
            # a top-k:1 index block of class 0 only was not written by writers before 2026-11-27: its
            # absence reads back as those zeros, so it is not required (its values file still is)
            out += [(name, shard) for name in (a.path.rsplit("/", 1)[-1] for a in self._label_arrays)
                    if not (name == "topk_idx" and self.topk == 1)]
            if not excluded[lo:hi].all():
                out.append(("windows", shard))
            if flip_prob > 0:
                out.append(("flips", shard))
        return out

    def missing_chunks(self) -> list[tuple[str, int]]:
        """Required chunk files (see ``required_chunks``) that are not in the store."""
        from zarr.core.sync import sync

        required = self.required_chunks()
        if not required:
            return []
        store = zarr_store(self.url, read_only=True)
        present: dict[str, set] = {}
        arrays = {}
        for name in {n for n, _ in required}:
            async def listing(prefix=f"{name}/"):
                return {k async for k in store.list_prefix(prefix)}

            present[name] = sync(listing())
            arrays[name] = self._member(name)  # opened once: each open reads its zarr.json
        missing = []
        for name, shard in required:
            if shard_file_key(arrays[name], shard) not in present[name]:
                missing.append((name, shard))
        return missing

    def _check_rows(self, raw: list[np.ndarray], ids: np.ndarray) -> None:
        """Refuse all-zero stored rows of done images: what zarr returns for a missing chunk."""
        values = raw[0] if self.encoding == DENSE else raw[1]
        empty = np.empty(len(values), bool)
        for lo in range(0, len(values), ROW_CHECK_BLOCK):  # in blocks: `values != 0` over a dense ImageNet epoch was a 1.3 GB temporary
            empty[lo:lo + ROW_CHECK_BLOCK] = ~values[lo:lo + ROW_CHECK_BLOCK].any(axis=-1)
        bad = empty & self.done[ids]
        if np.any(bad):
            image = int(ids[np.argmax(bad)])
            raise self.damaged(f"image {image} (shard {image // self.images_per_shard}) is marked done but its stored labels are all zero")

    # ------------------------------------------------------------------ small arrays
    @cached_property
    def paths(self) -> list[str]:
        return [str(p) for p in self.created_array("paths").tolist()]

    @cached_property
    def targets(self) -> np.ndarray:
        return self.created_array("targets").astype(np.int32, copy=False)

    @cached_property
    def sizes(self) -> np.ndarray:
        return self.created_array("sizes").astype(np.int32, copy=False)

    @cached_property
    def excluded(self) -> np.ndarray:
        return self.created_array("excluded").astype(bool, copy=False)

    @cached_property
    def _crop_arrays(self):
        """The zarr arrays ``windows`` and ``flips``, opened once (each open reads their metadata, a
        request per open on a remote store). Either layout: slot-sharded (inner chunk = one crop slot
        of a shard) or, in stores made before it, one plain chunk per shard; zarr reads both."""
        return self._member("windows"), self._member("flips")

    @cached_property
    def windows(self) -> np.ndarray:
        """All (N, R, 4) windows: O(N x R) memory; per-slot readers want :meth:`slot_crops`."""
        return self._reading(lambda: np.asarray(self._crop_arrays[0][:], np.int32))

    @cached_property
    def flips(self) -> np.ndarray:
        """All (N, R) flips: O(N x R) memory; per-slot readers want :meth:`slot_crops`."""
        return self._reading(lambda: np.asarray(self._crop_arrays[1][:], bool))

    @cached_property
    def done(self) -> np.ndarray:
        return self._reading(lambda: np.asarray(self._member("done")[:], bool))

    def slot_crops(self, slot: int, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(windows (n, 4) int32, flips (n,) bool) of crop ``slot`` for ``image_ids``, in their order.

        Selects that slot's column only: memory O(n), not O(N x R) like :attr:`windows`, and on a
        slot-sharded store zarr fetches just the touched shards' index and slot inner chunk (~1/R of
        the bytes; a store of the older plain layout fetches its whole shards, same rows). A
        contiguous id range is read as a slice (about 5x faster in zarr than the same ids as an
        integer array, e.g. a whole epoch of one process)."""
        if not 0 <= int(slot) < self.crops_per_image:
            raise IndexError(f"crop slot {slot} out of range [0, {self.crops_per_image})")
        ids = self._check_ids(image_ids, self.num_images, "image id")
        if ids.size == 0:
            return np.empty((0, 4), np.int32), np.empty(0, bool)
        uniq, inv = np.unique(ids, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        rows = slice(lo, hi) if hi - lo == uniq.size else uniq
        windows_array, flips_array = self._crop_arrays
        windows = self._reading(lambda: np.asarray(windows_array.get_orthogonal_selection((rows, int(slot), slice(None))), np.int32))
        flips = self._reading(lambda: np.asarray(flips_array.get_orthogonal_selection((rows, int(slot))), bool))
        return windows[inv.reshape(-1)], flips[inv.reshape(-1)]

    def crops(self, image_ids: np.ndarray, crop_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(windows (B, 4) int32, flips (B,) bool) of the pairs (image_ids[i], crop_ids[i]): random
        access, one :meth:`slot_crops` per distinct slot, so memory and bytes follow the pairs asked
        for, never the whole (N, R) arrays (``verify``'s sampled crops)."""
        ii = self._check_ids(image_ids, self.num_images, "image id")
        cc = self._check_ids(crop_ids, self.crops_per_image, "crop id")
        if ii.shape != cc.shape:
            raise ValueError(f"image_ids ({ii.size}) and crop_ids ({cc.size}) differ in length")
        windows, flips = np.zeros((ii.size, 4), np.int32), np.zeros(ii.size, bool)
        for slot in np.unique(cc).tolist():
            sel = np.flatnonzero(cc == slot)
            windows[sel], flips[sel] = self.slot_crops(slot, ii[sel])
        return windows, flips

    # ------------------------------------------------------------------ labels
    def _check_ids(self, ids: np.ndarray, bound: int, what: str) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= bound):
            raise IndexError(f"{what} out of range [0, {bound})")
        return ids

    async def _read_slot_async(self, uniq: np.ndarray, slot: int) -> list[np.ndarray]:
        """Raw stored arrays for sorted unique image ids at one crop slot."""
        if uniq.size == self.num_images:
            sel = (slice(None), int(slot), slice(None))
            return list(await asyncio.gather(*[a._async_array.getitem(sel) for a in self._label_arrays]))
        sel = (uniq, int(slot), slice(None))
        return list(await asyncio.gather(*[a._async_array.get_orthogonal_selection(sel) for a in self._label_arrays]))

    def _decode(self, raw: list[np.ndarray]) -> np.ndarray:
        if self.encoding == DENSE:
            return normalise_rows(raw[0])
        return decode_topk(raw[0], raw[1], self.num_classes)

    #: use :mod:`storage.rawshard` for lookups when possible (complete local store); set False to
    #: force zarr's own read path (the benchmark compares both)
    fast_path: bool = True

    @cached_property
    def _raw(self):
        """Direct shard readers for the label arrays, or None (not local / not complete / other codecs)."""
        if not is_local(self.url) or not self.done.all():
            return None
        from mealkd.storage.rawshard import RawShardArray

        try:
            return [RawShardArray(local_path(self.url), a) for a in self._label_arrays]
        except (TypeError, AttributeError, ImportError):
            return None

    def labels(self, image_ids: np.ndarray, crop_ids: np.ndarray) -> np.ndarray:
        """float32 (B, C) probability rows for (image_ids[i], crop_ids[i]); random access (:meth:`encoded`, decoded)."""
        ii = self._check_ids(image_ids, self.num_images, "image id")
        if ii.size == 0:
            return np.empty((0, self.num_classes), np.float32)
        return self._decode(self.encoded(image_ids, crop_ids))

    def encoded(self, image_ids: np.ndarray, crop_ids: np.ndarray) -> list[np.ndarray]:
        """The rows for (image_ids[i], crop_ids[i]) as stored: [fp16 probs] or [top-k indices, fp16 values].

        Chunk-aware: ids are grouped by crop slot; each slot's unique images are read with one
        orthogonal selection (every touched inner chunk read once), slots concurrently. Rows of done
        images that are all zero are refused as damage."""
        from zarr.core.sync import sync

        ii = self._check_ids(image_ids, self.num_images, "image id")
        cc = self._check_ids(crop_ids, self.crops_per_image, "crop id")
        if ii.shape != cc.shape:
            raise ValueError(f"image_ids ({ii.size}) and crop_ids ({cc.size}) differ in length")
        if self.fast_path and self._raw is not None:
            raw = self._reading(lambda: [ra.rows(ii, cc) for ra in self._raw])
            self._check_rows(raw, ii)
            return raw
        groups = []
        for slot in np.unique(cc):
            sel = np.nonzero(cc == slot)[0]
            uniq, inv = np.unique(ii[sel], return_inverse=True)
            groups.append((slot, sel, uniq, inv))

        async def read_all():
            return await asyncio.gather(*[self._read_slot_async(u, s) for s, _, u, _ in groups])

        out: list[np.ndarray] = []
        for (slot, sel, uniq, inv), raw in zip(groups, self._reading(lambda: sync(read_all()))):
            self._check_rows(raw, uniq)
            if not out:
                out = [np.empty((ii.size, *r.shape[1:]), r.dtype) for r in raw]
            for whole, part in zip(out, raw):
                whole[sel] = part[inv.reshape(-1)]
        return out

    def slot_labels(self, slot: int, image_ids: np.ndarray | None = None) -> np.ndarray:
        """float32 (len, C) labels of crop ``slot`` for ``image_ids`` (all images if None), in the
        order of ``image_ids``. Reads contiguous, chunk-aligned image blocks: the fast path for
        training (e.g. epoch e uses slot e mod R). Memory: len x C x 4 bytes."""
        return self.decode(self.slot_encoded(slot, image_ids))

    def slot_encoded(self, slot: int, image_ids: np.ndarray | None = None) -> list[np.ndarray]:
        """Like :meth:`slot_labels`, but the rows as stored (dense: [fp16 (len, C)]; top-k:
        [indices (len, k), fp16 values (len, k)]), to hold many rows compactly and :meth:`decode`
        them in small batches later. ``decode`` works row by row, so decoding any slice of these
        arrays gives exactly the matching rows of ``slot_labels``."""
        from zarr.core.sync import sync

        if not 0 <= int(slot) < self.crops_per_image:
            raise IndexError(f"crop slot {slot} out of range [0, {self.crops_per_image})")
        if image_ids is None and not (self.fast_path and self._raw is not None):
            raw = self._reading(lambda: sync(self._read_slot_async(np.arange(self.num_images), int(slot))))
            self._check_rows(raw, np.arange(self.num_images))
            return raw
        ids = np.arange(self.num_images) if image_ids is None else self._check_ids(image_ids, self.num_images, "image id")
        if ids.size == 0:
            return [np.empty((0, shape), dtype) for shape, dtype in self._encoded_row_layout()]
        if self.fast_path and self._raw is not None:
            slots = np.full(ids.size, int(slot), np.int64)
            raw = self._reading(lambda: [ra.rows(ids, slots) for ra in self._raw])
            self._check_rows(raw, ids)
            return raw
        uniq, inv = np.unique(ids, return_inverse=True)
        raw = self._reading(lambda: sync(self._read_slot_async(uniq, int(slot))))
        self._check_rows(raw, uniq)
        return [a[inv.reshape(-1)] for a in raw]

    def _encoded_row_layout(self) -> list[tuple[int, np.dtype]]:
        return [(int(a.shape[-1]), np.dtype(a.dtype)) for a in self._label_arrays]

    def decode(self, raw: list[np.ndarray]) -> np.ndarray:
        """Stored rows (from :meth:`slot_encoded`) -> float32 probability rows summing to 1."""
        return self._decode(raw)

    # ------------------------------------------------------------------ summaries
    def nbytes_on_disk(self) -> int:
        """Sum of the sizes of every stored key (via the zarr store's listing)."""
        from zarr.core.sync import sync

        if is_local(self.url):  # LocalStore.getsize_prefix stats every file; os.walk is the same, faster
            import os

            total = 0
            for root, _, files in os.walk(local_path(self.url)):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
            return total
        store = zarr_store(self.url, read_only=True)
        return int(sync(store.getsize_prefix("")))

    def label_stats(self, sample: int = 4096, seed: int = 0) -> dict:
        """Mean top-1 probability, mean entropy (nats) and top-1 == target rate over a random
        sample of (image, crop) pairs of done, non-excluded images; NaN with ``samples`` 0 when none are
        sampled (no finished image, or ``sample`` 0: ``inspect --sample 0``), without numpy's
        empty-mean warnings."""
        eligible = np.nonzero(self.done & ~self.excluded)[0]
        if eligible.size == 0 or sample <= 0:
            return {"samples": 0, "mean_top1": float("nan"), "mean_entropy": float("nan"),
                    "top1_matches_target": float("nan")}
        rng = np.random.default_rng(seed)
        total = eligible.size * self.crops_per_image
        n = int(min(sample, total))
        flat = rng.choice(total, size=n, replace=False) if n < total else np.arange(total)
        imgs = eligible[flat // self.crops_per_image]
        crops = flat % self.crops_per_image
        rows = self.labels(imgs, crops).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(rows > 0, rows * np.log(rows), 0.0).sum(axis=1)
        return {
            "samples": n,
            "mean_top1": float(rows.max(axis=1).mean()),
            "mean_entropy": float(ent.mean()),
            "top1_matches_target": float((rows.argmax(axis=1) == self.targets[imgs]).mean()),
        }

    # ------------------------------------------------------------------ whole-image blocks
    def block_crops(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(windows (n, R, 4) int32, flips (n, R) bool) of images [start, stop): all their crops
        (every slot's inner chunk of the touched shards; extend, merge and verify read this way)."""
        return (self._reading(lambda: np.asarray(self._crop_arrays[0][start:stop], np.int32)),
                self._reading(lambda: np.asarray(self._crop_arrays[1][start:stop], bool)))

    def block_encoded(self, start: int, stop: int) -> list[np.ndarray]:
        """Stored label arrays of images [start, stop), all crops, as stored (dense: [fp16 (n, R, C)];
        top-k: [indices (n, R, k), fp16 values (n, R, k)]). All-zero rows of done images (a missing
        chunk read as fill values) are refused like every other read."""
        raw = self._reading(lambda: [np.asarray(a[start:stop]) for a in self._label_arrays])
        n, r = stop - start, self.crops_per_image
        ids = np.repeat(np.arange(start, stop), r)
        self._check_rows([a.reshape(n * r, -1) for a in raw], ids)
        return raw

    def block_labels(self, start: int, stop: int) -> np.ndarray:
        """float32 (n, R, C) probability rows of images [start, stop), decoded like :meth:`labels`."""
        return self.decode(self.block_encoded(start, stop))

    def shard_fidelity(self) -> np.ndarray | None:
        """Top-k stores: the per-shard fidelity rows (S, 3) = (sum_tv, max_tv, rows); None for dense."""
        if self.topk is None:
            return None
        return self._reading(lambda: np.asarray(self._member("fidelity")[:], np.float64))
