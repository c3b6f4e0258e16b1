"""Creating a label store and writing its labels shard by shard (resumable, multi-process).

Crash safety
------------
* ``done`` is the single source of truth. ``StoreWriter.write_shard`` writes windows, flips and the
  label arrays for the whole shard (one file each: a whole-shard assignment to a sharded array
  encodes all its inner chunks into one shard file, written once), flushes them to disk (fsync,
  local stores; the file is ``<array>/c/<shard>/0[/0]`` whatever the array's layout), and
  only then writes ``done=True`` for the shard's images (one file). A writer killed at any point
  leaves the shard's ``done`` chunk absent or all-False, so the shard is pending and is rewritten on
  resume; encoding is deterministic (argpartition/argsort, Blosc), so a rewritten shard has the same
  bytes as an uninterrupted run's.
* zarr 3.1's LocalStore (used for local paths and ``file://`` URLs) writes every key atomically:
  it writes ``<key>.<uuid>.partial`` and renames it over the key (``zarr/storage/_local.py``,
  ``_atomic_write``). So a SIGKILL can never leave a torn shard file or a torn ``zarr.json``; at
  worst a stray ``*.partial`` file remains (ignored by zarr; the next writer removes it under the lock). It does
  not fsync; we fsync the shard files ourselves before marking them done so "done" also survives a
  power loss. Object stores (s3, gcs, ...) replace objects atomically per PUT. fsspec's plain
  local/network filesystems (other than ``file://``, which we route to LocalStore) are not atomic:
  a kill there can tear a file, but ``done`` is still written last, so labels are never trusted
  before they are complete; only a torn ``zarr.json`` (finalize) could break the store there.
* ``finalize`` changes attributes with one ``zarr.json`` rewrite (atomic on LocalStore) and is
  idempotent.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import uuid
from typing import Sequence

import numpy as np

from mealkd.storage import remote
from mealkd.storage.encoding import encode_topk, to_f16, topk_tv
from mealkd import __version__
from mealkd.errors import UserError
from mealkd.faults import kill_point
from mealkd.storage.schema import (
    DECODER_DRIFT, DENSE, FORMAT, META_CHUNK, RESERVED_ATTRS, TOPK, VERSION, array_names, chunk_images_for, crop_inner_chunks,
    default_images_per_shard, encoding_attr, encoding_from_attr, is_local, label_row_bytes, local_path, parse_encoding,
    label_array_names, open_group, shard_file_key, topk_index_dtype, zarr_store,
)
from mealkd.storage.damage import member


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _blosc(shuffle: str = "shuffle", clevel: int = 5):
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle)


def _anything_at(url: str) -> bool:
    if is_local(url):
        p = local_path(url)
        return p.exists() and (not p.is_dir() or any(p.iterdir()))
    from zarr.core.sync import sync

    return not sync(zarr_store(url, read_only=True).is_empty(""))


_STORE_NODES = {"zarr.json", *array_names(DENSE), *array_names(TOPK)}


def _unfinished_create(url: str) -> bool:
    """True if ``url`` holds exactly what a create_store killed before its last step leaves: a Zarr
    group without attributes (or no group metadata yet) whose entries are only label-store arrays
    and zarr's ``*.partial`` temp files. Such a leftover (never a
    user's data, never a finished store) is replaced instead of refused, so a rerun continues."""
    import zarr
    from zarr.core.sync import sync

    try:
        store = zarr_store(url, read_only=True)

        async def entries():
            return [e async for e in store.list_dir("")]

        # LocalStore writes "<key>.<uuid>.partial" and renames it: a kill can leave such temp files
        names = {name for name in sync(entries()) if not name.endswith(".partial")}
        if not names <= _STORE_NODES:
            return False
        if "zarr.json" not in names:
            return True  # killed before the group's own metadata landed: only our arrays or temp files
        return not zarr.open_group(store, mode="r").attrs.asdict()
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to replace
        return False


def remove_partial_files(url: str) -> None:
    """Delete zarr's ``*.partial`` temp files a killed writer left in a local store (a writer calls this holding
    the store's lock, so no write is in flight). Remote stores write whole objects."""
    if is_local(url):
        for leftover in local_path(url).rglob("*.partial"):  # nothing when the store does not exist yet
            leftover.unlink(missing_ok=True)


def check_output(url: str, flag: str = "--out") -> None:
    """Refuse, before any work (a store-writing command may decode every image first: hours), a local
    output path no store can be written at: a file, a non-empty directory that is neither a label store
    nor a killed create's leftover, or a new path whose nearest existing parent is a file or cannot be
    written. A store already there passes (its settings are the caller's to check). A remote URL gets
    its preflight (``remote.check_remote_output``); write permission shows at its first write."""
    if not is_local(url):
        remote.check_remote_output(url, flag)
        return
    path = local_path(url)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {url}: a file is there, not a label store (a store is a directory); "
                            f"choose a new {flag} path or delete the file")
        # in this order: a concurrent create goes from unfinished to finished, never back, so one of the two sees it
        # (the other order could find it unfinished-not-yet-formatted, then formatted-so-not-unfinished, and refuse it)
        if _unfinished_create(url) or _has_store_format(path):
            return
        if any(path.iterdir()):
            raise UserError(f"{flag} {url}: a directory that is not a label store is already there; "
                            f"choose a new {flag} path or delete it first")
        _check_writable(path, url, flag)
        return
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"{flag} {url}: cannot be created: {parent} is a file, not a directory; choose another {flag} path")
    _check_writable(parent, url, flag)


def _has_store_format(path) -> bool:
    """A mealkd store's group metadata is there (versions and damage are the reader's to judge)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_writable(directory, url: str, flag: str) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
        raise UserError(f"{flag} {url}: cannot write there ({'Read-only file system' if read_only else 'Permission denied'}: "
                        f"{directory}); choose a writable location")


def create_store(url: str, *, attributes: dict, paths: Sequence[str], targets: np.ndarray,
                 sizes: np.ndarray, crops_per_image: int, num_classes: int, encoding: str,
                 excluded: np.ndarray | None = None, images_per_shard: int | None = None, processes: int = 1) -> None:
    """Create the group, its attributes and all arrays (empty labels, done=False).

    ``processes``: how many processes will label it (sizes the default shard, see
    ``schema.default_images_per_shard``).

    ``attributes``: everything the caller knows (class_names, crop policy, teachers, temperature,
    dataset {num_images, fingerprint}, decoder backend, dali version, ...). create_store adds
    ``format``, ``version``, ``num_classes``, ``crops_per_image``, ``label_encoding``
    (``{"kind": "dense-f16"}`` or ``{"kind": "topk", "k": K}``), ``images_per_shard``, ``created``
    (UTC ISO time), ``mealkd_version`` and ``store_id`` (a random UUID: the store's identity, which
    a distill checkpoint records). The group's ``zarr.json`` with these attributes is written
    last, so a killed create never looks like a mealkd store. Refuses (UserError) if anything
    already exists at ``url``.
    """
    import zarr

    kind, k = parse_encoding(encoding)
    n = len(paths)
    r, c = int(crops_per_image), int(num_classes)
    if n < 1:
        raise UserError(f"{url}: the dataset has no images; nothing to store")
    if r < 1 or c < 2:
        raise ValueError(f"crops_per_image={r} must be >= 1 and num_classes={c} >= 2")
    if kind == TOPK and not k < c:
        raise UserError(f"label encoding topk:{k} needs K < num_classes ({c}); use a smaller K or 'dense'")
    targets = np.asarray(targets)
    sizes = np.asarray(sizes)
    if targets.shape != (n,) or sizes.shape != (n, 2):
        raise ValueError(f"targets {targets.shape} / sizes {sizes.shape} must be ({n},) / ({n}, 2)")
    if n and (targets.min() < 0 or targets.max() >= c):
        raise ValueError(f"targets must lie in [0, {c})")
    excluded = np.zeros(n, bool) if excluded is None else np.asarray(excluded, bool)
    if excluded.shape != (n,):
        raise ValueError(f"excluded {excluded.shape} must be ({n},)")
    attributes = dict(attributes)
    names = attributes.get("class_names")
    if names is not None and len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries, num_classes={c}")
    ds_n = (attributes.get("dataset") or {}).get("num_images")
    if ds_n is not None and ds_n != n:
        raise ValueError(f"attributes dataset.num_images={ds_n} but {n} paths")
    if images_per_shard is None:
        ips = default_images_per_shard(n, r, c, kind, k, processes)
    else:
        ips = int(images_per_shard)
        if ips < 1:
            raise UserError(f"images per shard must be >= 1 (got {images_per_shard})")
    own = {
        "format": FORMAT, "version": VERSION, "num_classes": c, "crops_per_image": r,
        "label_encoding": encoding_attr(kind, k), "images_per_shard": ips,
        "created": _now(), "mealkd_version": __version__,
        "store_id": uuid.uuid4().hex,  # this store's identity: two stores over the same images differ here
    }
    for key in RESERVED_ATTRS:
        if key in attributes and key not in ("created", "mealkd_version", "store_id") and attributes[key] != own[key]:
            raise ValueError(f"attribute {key!r}={attributes[key]!r} conflicts with {own[key]!r}")
    attributes.update(own)
    try:
        json.dumps(attributes)
    except TypeError as err:
        raise ValueError(f"attributes must be JSON-serialisable: {err}") from None

    unfinished = _unfinished_create(url)
    if not unfinished and _anything_at(url):
        raise UserError(f"{url} already exists: choose a new output path or delete it first")

    store = zarr_store(url, read_only=False)
    group = zarr.create_group(store, attributes={}, overwrite=unfinished)  # attributes come last (see docstring)
    meta = max(1, min(n, META_CHUNK))

    def arr(name, shape, dtype, chunks, shards=None, shuffle="shuffle", clevel=5, **kw):
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                  compressors=_blosc(shuffle, clevel), fill_value=kw.pop("fill_value", 0), **kw)

    p = group.create_array("paths", shape=(n,), dtype=str, chunks=(meta,))
    p[:] = np.asarray([str(x) for x in paths], dtype=str)
    arr("targets", (n,), "int32", (meta,))[:] = targets.astype(np.int32)
    arr("sizes", (n, 2), "int32", (meta, 2))[:] = sizes.astype(np.int32)
    arr("excluded", (n,), "bool", (meta,), fill_value=False)[:] = excluded
    # windows/flips: one shard file per image shard like every array a writer touches, one inner
    # chunk per crop slot of the whole shard, so a slot read (stage two, one slot per epoch) fetches
    # ~1/R of them (storage.schema, "Sharding / chunking choice"; stores made before read the same).
    # flips bit-shuffled: a bool is one bit of entropy in a byte, and per-slot inner chunks
    # byte-shuffled would store up to 1.7x the plain layout's bytes; bit-shuffled they store about as much
    arr("windows", (n, r, 4), "int32", crop_inner_chunks(ips, 4), shards=(ips, r, 4))
    arr("flips", (n, r), "bool", crop_inner_chunks(ips), shards=(ips, r), shuffle="bitshuffle", fill_value=False)
    arr("done", (n,), "bool", (ips,), fill_value=False)
    if kind == DENSE:
        ci = chunk_images_for(label_row_bytes(kind, k, c)[0], ips)
        arr("probs", (n, r, c), "float16", (ci, 1, c), shards=(ips, r, c), shuffle="bitshuffle", clevel=1)
    else:
        b_idx, b_val = label_row_bytes(kind, k, c)
        arr("topk_idx", (n, r, k), topk_index_dtype(c), (chunk_images_for(b_idx, ips), 1, k), shards=(ips, r, k))
        arr("topk_val", (n, r, k), "float16", (chunk_images_for(b_val, ips), 1, k), shards=(ips, r, k),
            shuffle="bitshuffle")
        num_shards = -(-n // ips)
        arr("fidelity", (num_shards, 3), "float64", (1, 3))
    kill_point("create-attrs")
    group.update_attributes(attributes)


class StoreWriter:
    """Writes labels into an existing store, one whole shard at a time.

    Several processes may each hold a StoreWriter on the same store as long as they write disjoint
    shards (e.g. ``pending_shards(rank, world_size)``).
    """

    def __init__(self, url: str):
        self.url = str(url)
        self._group, self.attrs = open_group(self.url, read_only=False)
        a = self.attrs
        self.kind, self.k = encoding_from_attr(a["label_encoding"])
        self.crops_per_image = int(a["crops_per_image"])
        self.num_classes = int(a["num_classes"])
        self.images_per_shard = int(a["images_per_shard"])
        self._done = self._member("done")
        self.num_images = int(self._done.shape[0])
        self.num_shards = -(-self.num_images // self.images_per_shard)
        # write_empty_chunks: a done shard has a file in every array it wrote, even an all-False flips
        # block or an all-zero top-1 index block (top-k:1, every crop's top class 0), so a missing file
        # always means damage (LabelStore.missing_chunks)
        every = {"write_empty_chunks": True}
        self._windows = self._member("windows").with_config(every)
        self._flips = self._member("flips").with_config(every)
        self._labels = [self._member(name).with_config(every) for name in label_array_names(self.kind)]
        if self.kind == TOPK:
            self._fidelity = self._member("fidelity").with_config(every)
            self._index_dtype = self._labels[0].dtype
        self._excluded = np.asarray(self._member("excluded")[:], bool)

    def _member(self, name: str):
        return member(self._group, name, self.url, self.attrs)

    # ------------------------------------------------------------------ shards
    def shard_range(self, shard: int) -> tuple[int, int]:
        """[start, stop) image ids of ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.num_images)

    def images_in(self, shards: list[int]) -> int:
        """How many images of ``shards`` get labels (the work of labelling them): those not excluded at the
        store's creation (unreadable files keep placeholder rows, and no crop of theirs is labelled)."""
        return sum(int((~self._excluded[start:stop]).sum()) for start, stop in map(self.shard_range, shards))

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._done[:], bool)

    def pending_shards(self) -> list[int]:
        """Shards with any image not done (how they are split over ranks: ``precompute.runner.pending_for_rank``)."""
        done = self.done_mask()
        padded = np.ones(self.num_shards * self.images_per_shard, bool)
        padded[: self.num_images] = done
        return [int(s) for s in np.nonzero(~padded.reshape(self.num_shards, -1).all(axis=1))[0]]

    # ------------------------------------------------------------------ writing
    def _crops(self, shard: int, windows, flips) -> tuple[np.ndarray, np.ndarray]:
        """A whole shard's windows (n, R, 4) and flips (n, R), checked; windows as int32."""
        start, stop = self.shard_range(shard)
        n, r = stop - start, self.crops_per_image
        windows, flips = np.asarray(windows), np.asarray(flips)
        if windows.shape != (n, r, 4) or not np.issubdtype(windows.dtype, np.integer):
            raise ValueError(f"windows must be ({n}, {r}, 4) integer, got {windows.shape} {windows.dtype}")
        if flips.shape != (n, r) or flips.dtype != np.bool_:
            raise ValueError(f"flips must be ({n}, {r}) bool, got {flips.shape} {flips.dtype}")
        if windows.size and (windows.min() < 0 or windows.max() > np.iinfo(np.int32).max):
            raise ValueError("windows must be (y, x, h, w) with 0 <= values < 2**31 (excluded images may be all 0)")
        return windows.astype(np.int32), flips

    def _validate(self, shard: int, probs) -> np.ndarray:
        """A whole shard's probability rows (n, R, C), checked, as float32."""
        start, stop = self.shard_range(shard)
        n, r, c = stop - start, self.crops_per_image, self.num_classes
        probs = np.asarray(probs)
        if probs.shape != (n, r, c) or not np.issubdtype(probs.dtype, np.floating):
            raise ValueError(f"probs must be ({n}, {r}, {c}) float, got {probs.shape} {probs.dtype}")
        probs = probs.astype(np.float32, copy=False)
        if not np.all(np.isfinite(probs)):
            raise ValueError(f"shard {shard}: probs contain NaN/inf")
        if probs.min() < -1e-6:
            raise ValueError(f"shard {shard}: probs contain negative values")
        sums = probs.sum(axis=-1, dtype=np.float64)
        bad = np.abs(sums - 1.0) > 1e-3
        if np.any(bad):
            i = np.argwhere(bad)[0]
            raise ValueError(f"shard {shard}: probs row (image {start + i[0]}, crop {i[1]}) sums to {sums[tuple(i)]:.6f}, not 1")
        return probs

    def write_shard(self, shard: int, windows: np.ndarray, flips: np.ndarray, probs: np.ndarray) -> None:
        """Write windows (n,R,4) int32 (y,x,h,w), flips (n,R) bool and probs (n,R,C) float rows
        summing to 1 for the WHOLE shard; then, after those writes returned (and were fsynced on
        local stores), ``done=True`` for the shard's images."""
        windows, flips = self._crops(shard, windows, flips)
        probs = self._validate(shard, probs)
        if self.kind == DENSE:
            self._write(shard, windows, flips, [to_f16(probs)], None)
            return
        start, stop = self.shard_range(shard)
        idx, val = encode_topk(probs, self.k, self._index_dtype)
        keep = ~self._excluded[start:stop]  # unreadable images' placeholder rows don't count
        self._write(shard, windows, flips, [idx, val], topk_tv(probs[keep], idx[keep], val[keep]))

    def _write(self, shard: int, windows: np.ndarray, flips: np.ndarray, labels: Sequence[np.ndarray],
               fidelity: tuple[float, float, int] | None) -> None:
        """The one write of a shard: its old files deleted, windows, flips, labels (and fidelity), their
        files fsynced, and only then ``done`` for its images."""
        start, stop = self.shard_range(shard)
        self._clear_shard(shard)
        self._windows[start:stop] = windows
        kill_point("shard-windows")
        self._flips[start:stop] = flips
        for have, arr in zip(labels, self._labels):
            arr[start:stop] = have
        if fidelity is not None:
            self._fidelity[shard] = np.asarray(fidelity, np.float64)
        self._fsync(self._shard_arrays(), shard)
        kill_point("shard-before-done")
        self._done[start:stop] = np.ones(stop - start, bool)
        kill_point("shard-done")

    def _shard_arrays(self) -> list:
        """Every array a shard write touches (``done`` aside)."""
        return [self._windows, self._flips, *self._labels, *([self._fidelity] if self.kind == TOPK else [])]

    def _clear_shard(self, shard: int) -> None:
        """Delete the files a previous write of ``shard`` left, before it is written again. A shard is
        rewritten whole, but zarr's sharding codec first reads the old file's index: a truncated or torn
        file (what ``verify --repair`` marks not done) would fail every rewrite."""
        from zarr.core.sync import sync

        store = self._group.store
        for array in self._shard_arrays():
            sync(store.delete(shard_file_key(array, shard)))

    def _fsync(self, arrays, shard: int) -> None:
        """fsync ``shard``'s file of each array and their directories (local stores), so ``done`` is
        only written over data that survives a power loss (the file: ``schema.shard_file_key``)."""
        if not is_local(self.url):
            return
        root = local_path(self.url)
        dirs = set()
        for a in arrays:
            path = root / shard_file_key(a, shard)
            try:  # every array's file is there (write_empty_chunks): one missing is a lost write, not done
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise OSError(errno.EIO, f"shard {shard}'s file {shard_file_key(a, shard)} is not there right after its write") from None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
        for d in dirs:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def mark_not_done(self, shards: Sequence[int]) -> None:
        """Mark ``shards`` not done (``verify --repair``: a precompute rerun rewrites them) and drop the
        store's ``completed`` record, which no longer holds: first, so that a kill in between leaves no
        incomplete store recorded as completed (the rerun finds the same damage)."""
        if "completed" in self._group.attrs.asdict():
            del self._group.attrs["completed"]
            self.attrs = self._group.attrs.asdict()
        for shard in sorted(shards):
            start, stop = self.shard_range(shard)
            self._done[start:stop] = np.zeros(stop - start, bool)

    def finalize(self) -> bool:
        """If every image is done, record ``completed`` (UTC ISO time) and, for top-k,
        ``fidelity`` {metric, mean_tv, max_tv, rows} over the crops of non-excluded images.
        Returns completeness; idempotent (a second call changes nothing)."""
        if not self.done_mask().all():
            return False
        current = self._group.attrs.asdict()
        if "completed" in current:
            self.attrs = current
            return True
        new = {"completed": _now()}
        if self.kind == TOPK:
            fid = np.asarray(self._fidelity[:], np.float64)
            rows = float(fid[:, 2].sum())
            new["fidelity"] = {
                "metric": "total variation between dense rows and decoded top-k rows",
                "mean_tv": float(fid[:, 0].sum() / rows) if rows else 0.0,
                "max_tv": float(fid[:, 1].max()) if len(fid) else 0.0,
                "rows": int(rows),
            }
        kill_point("finalize")
        self._group.update_attributes(new)
        self.attrs = self._group.attrs.asdict()
        return True

    def record_decoder_drift(self, entry: dict) -> bool:
        """Append ``entry`` (``{"decoder": record, ...}``), stamped with the time (``at``), to the store's
        ``decoder_drift`` list, unless an entry with the same decoder record is there already (a resumed run
        accepts it again); True if added. One ``zarr.json`` rewrite (atomic on LocalStore); call it from one process."""
        current = self._group.attrs.asdict()
        drift = list(current.get(DECODER_DRIFT) or [])
        if any(old.get("decoder") == entry.get("decoder") for old in drift):
            return False
        self._group.update_attributes({DECODER_DRIFT: [*drift, dict(entry, at=_now())]})
        self.attrs = self._group.attrs.asdict()
        return True

    def write_shard_encoded(self, shard: int, windows: np.ndarray, flips: np.ndarray, labels: Sequence[np.ndarray],
                            fidelity: tuple[float, float, int] | None = None) -> None:
        """Like :meth:`write_shard`, but the label arrays come already in the store's encoding
        (dense: ``[fp16 (n, R, C)]``; top-k: ``[indices (n, R, k), fp16 values (n, R, k)]``) with, for
        top-k, the shard's fidelity row ``(sum_tv, max_tv, rows)``. For writers that copy stored rows
        (``mealkd extend``): a top-k row cannot be re-encoded from its decoded form without changing
        it, and its fidelity cannot be re-measured without the dense row. Same order and crash
        safety as ``write_shard``: data, fsync, then ``done``."""
        windows, flips = self._crops(shard, windows, flips)
        start, stop = self.shard_range(shard)
        n, r = stop - start, self.crops_per_image
        if len(labels) != len(self._labels):
            raise ValueError(f"expected {len(self._labels)} label array(s) for encoding {self.kind}, got {len(labels)}")
        labels = [np.asarray(have) for have in labels]
        for have, arr in zip(labels, self._labels):
            want = (n, r, arr.shape[-1])
            if have.shape != want or have.dtype != arr.dtype:
                raise ValueError(f"{arr.path} block must be {want} {arr.dtype}, got {have.shape} {have.dtype}")
        if (self.kind == TOPK) != (fidelity is not None):
            raise ValueError("a fidelity row is required for top-k stores and only for them")
        self._write(shard, windows, flips, labels, fidelity)
