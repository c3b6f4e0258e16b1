"""Label-store schema: constants, the encoding string, the on-disk layout, and URL -> zarr store.

Layout (Zarr v3 group, first axis of every per-image array = image index in the dataset's sorted
order; see docs/architecture.md, section 6)::

    zarr.json            group attributes (format, version, num_classes, class_names, ...)
    paths     (N,)       string   written once by create_store
    targets   (N,)       int32    "
    sizes     (N, 2)     int32    "  decoded (height, width)
    excluded  (N,)       bool     "  unreadable source files (precompute --skip-bad)
    windows   (N, R, 4)  int32    written by the shard's writer (inner chunk: one crop slot)
    flips     (N, R)     bool     "  (inner chunk: one crop slot)
    probs     (N, R, C)  float16  "  dense encoding only
    topk_idx  (N, R, k)  uint16 (int32 if C > 65535)   topk encoding only
    topk_val  (N, R, k)  float16                       topk encoding only
    fidelity  (S, 3)     float64  topk only: per shard (sum_tv, max_tv, n_rows)
    done      (N,)       bool     set True for a shard's images only after all of the above

Attribute ``label_encoding`` is always an object: ``{"kind": "dense-f16"}`` or
``{"kind": "topk", "k": K}`` (one representation, so readers never branch on the JSON type).

Sharding / chunking choice
--------------------------
* One **shard** = ``images_per_shard`` whole images (all R crops, all C classes). Every array a
  writer touches (windows, flips, labels, done, fidelity) has exactly one file per shard covering the
  same image block, so one worker writes one shard and never touches another worker's files (zarr
  writes to one file from two processes lose data: last writer wins).
* Label arrays use zarr's ShardingCodec with **inner chunks** ``(chunk_images, 1, width)``: one crop
  slot for a block of images. Reading crop slot ``s`` for a block of images (the training fast
  path, ``LabelStore.slot_labels``) touches one inner chunk per ``chunk_images`` images, and a
  random (image, crop) lookup decodes just one inner chunk. ``chunk_images`` is the power of two
  that makes an inner chunk about ``TARGET_INNER_BYTES`` (32 KiB) raw: 16 images for 1000-class
  fp16 rows, 512-1024 images for top-k.
* ``images_per_shard`` defaults to ``TARGET_SHARD_BYTES`` (256 MiB) of *dense fp16* labels per
  shard (whatever the encoding, because the writer receives dense float32 rows for a whole shard,
  2x that in memory), rounded down to a multiple of the inner chunk, at most
  ``MAX_IMAGES_PER_SHARD``. ImageNet (1,281,167 images, R=100, C=1000): 1328 images/shard (266 MB
  raw fp16, 531 MB of float32 input per write) -> 965 shards; files = 4 per shard (probs,
  windows, flips, done; topk: topk_idx, topk_val, windows, flips, done, fidelity) + a handful for
  the create-time arrays, i.e. ~3.9k files (~5.8k for top-k), of which the 965 label shards hold
  ~all the bytes. With R=8: 16384 images/shard (the cap) -> 79 shards. A store made by a job of P > 1 processes
  gets at most ~N / 4P images per shard (:func:`default_images_per_shard`): R=8 on 64 GPUs -> 256 shards.
* ``windows`` / ``flips`` are sharded too: shard ``(ips, R, 4)`` / ``(ips, R)`` (still one file per
  image shard), **inner chunk** ``(ips, 1, 4)`` / ``(ips, 1)``: one crop slot of the whole shard
  (:func:`crop_inner_chunks`). Stage two reads one slot per image per epoch (``slot_crops``), so it
  fetches and decodes ~1/R of them (+ a 16-byte index entry per slot and shard) instead of all of
  them, and per-rank memory no longer grows with R. Why not the labels' ``chunk_images``: a window
  row is 16 bytes and a flip 1, so 16-image inner chunks (dense, 1000 classes) are 256 / 16 bytes
  raw, where the shard index (16 B per inner chunk) and Blosc's header outweigh the data. Measured
  (ImageNet-like shards, R = 16 and 100): labels' ``ci`` = 16 stores 2.6x the bytes of the plain
  layout and a slot read fetches 18-22% of the arrays; ``ci = ips`` stores +1-6% and a slot read
  fetches 1.0-1.5/R (1.5 at R = 100, ips = 1328: the indexes), in two range requests per shard and
  array (index, slot). Stores made before this layout (plain chunks ``(ips, R, 4)`` / ``(ips, R)``,
  one chunk per shard) read the same through zarr (a slot read then fetches the whole arrays);
  nothing branches on the layout, and the file of a shard is ``<array>/c/<shard>/0[/0]`` in both.
* Create-time arrays (paths, targets, sizes, excluded) are written once before any worker starts,
  so they use large plain chunks (``META_CHUNK`` images).
* Codec: Blosc zstd; bit-shuffle for float16 labels and for flips (a bool holds one bit: split per
  slot, byte-shuffled flips would store up to 1.7x the plain layout's bytes), byte-shuffle
  elsewhere. Dense fp16 rows use level 1: on softmax rows it is 0.6% bigger than level 5 (1424 vs
  1416 B/crop, 1000 classes) but encodes ~3x faster (~100k vs ~36k crops/s on one core), which keeps
  the writer off the critical path of a fast teacher pass. Everything else (small) uses level 5.
"""
from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
from pathlib import Path

from mealkd.errors import UserError

FORMAT = "mealkd-labels"
#: store format version. Not bumped for the slot-sharded windows/flips: the layout is described by
#: each array's own zarr metadata, and every version-1 reader (this one and earlier ones) reads,
#: resumes, verifies, extends and merges both layouts through zarr, with the same shard file names;
#: a bump would only make older mealkd refuse stores it reads correctly.
VERSION = 1

DENSE = "dense-f16"
TOPK = "topk"

TARGET_SHARD_BYTES = 256 * 2**20
TARGET_INNER_BYTES = 32 * 2**10
MAX_CHUNK_IMAGES = 1024
MAX_IMAGES_PER_SHARD = 16384
#: a store made by a multi-process job gets (by default) about this many shards per process
SHARDS_PER_PROCESS = 4
META_CHUNK = 1 << 17

#: the per-image arrays written once, when a store is created; no rerun rewrites them (``storage.damage``)
CREATE_TIME_ARRAYS = ("paths", "targets", "sizes", "excluded")


def label_array_names(kind: str) -> tuple[str, ...]:
    """The arrays holding a store's label rows in encoding ``kind``: DENSE's fp16 rows, or TOPK's indices and values."""
    return ("probs",) if kind == DENSE else ("topk_idx", "topk_val")


def array_names(kind: str) -> tuple[str, ...]:
    """Every array of a store whose label encoding is ``kind`` (DENSE or TOPK)."""
    return (*CREATE_TIME_ARRAYS, "windows", "flips", "done", *label_array_names(kind), *(("fidelity",) if kind == TOPK else ()))


#: attribute listing the decoders, other than the one ``decoder`` records, that decoded some of the
#: store's crops (a run continued or extended elsewhere with ``--allow-decoder-mismatch``): a list of
#: ``{"decoder": record, "fields": [differing keys], "command": ..., "at": UTC ISO time}``
DECODER_DRIFT = "decoder_drift"

#: attribute keys create_store owns (a caller may not set them to something else)
RESERVED_ATTRS = (
    "format", "version", "num_classes", "crops_per_image", "label_encoding", "images_per_shard",
    "created", "mealkd_version", "store_id",
)


def parse_encoding(text: str) -> tuple[str, int | None]:
    """'dense' or 'dense-f16' -> ('dense-f16', None); 'topk:K' -> ('topk', K).

    K >= 1 is checked here; K < num_classes is checked by create_store.
    """
    t = str(text).strip().lower()
    if t in ("dense", "dense-f16"):
        return DENSE, None
    m = re.fullmatch(r"top-?k\s*[:=]\s*(\d+)", t)
    if m and int(m.group(1)) >= 1:
        return TOPK, int(m.group(1))
    raise UserError(
        f"invalid label encoding {text!r}: use 'dense' (fp16 rows) or 'topk:K' with K >= 1 (e.g. topk:20)"
    )


def encoding_attr(kind: str, k: int | None) -> dict:
    return {"kind": DENSE} if kind == DENSE else {"kind": TOPK, "k": int(k)}


def encoding_from_attr(value) -> tuple[str, int | None]:
    """Inverse of :func:`encoding_attr` (also accepts the plain strings 'dense-f16' / 'topk:K')."""
    if isinstance(value, dict):
        if value.get("kind") == DENSE:
            return DENSE, None
        if value.get("kind") == TOPK and isinstance(value.get("k"), int):
            return TOPK, int(value["k"])
        raise ValueError(f"unknown label_encoding {value!r}")
    return parse_encoding(value)


def topk_index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes <= 65535 else "int32"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def chunk_images_for(row_bytes: int, images_per_shard: int | None = None) -> int:
    """Images per inner chunk for an array whose one (image, crop) row is ``row_bytes`` raw."""
    ci = min(MAX_CHUNK_IMAGES, _pow2_floor(TARGET_INNER_BYTES / max(1, row_bytes)))
    if images_per_shard is not None:
        ci = math.gcd(ci, images_per_shard)  # ci is a power of two: largest one dividing both
    return max(1, ci)


def crop_inner_chunks(images_per_shard: int, *width: int) -> tuple[int, ...]:
    """Inner chunk of ``windows`` (``width`` = 4) / ``flips`` (no width): one crop slot of a whole
    shard, ``(ips, 1, *width)``, so a slot read fetches ~1/R of the array (see the module docstring
    for why not the labels' ``chunk_images``). Divides the shard ``(ips, R, *width)`` for any ips."""
    return (int(images_per_shard), 1, *(int(w) for w in width))


def label_row_bytes(kind: str, k: int | None, num_classes: int) -> list[int]:
    """Raw bytes of one (image, crop) row of each label array."""
    if kind == DENSE:
        return [2 * num_classes]
    idx_bytes = 2 if topk_index_dtype(num_classes) == "uint16" else 4
    return [idx_bytes * k, 2 * k]


def default_images_per_shard(num_images: int, crops_per_image: int, num_classes: int,
                             kind: str, k: int | None, processes: int = 1) -> int:
    """``TARGET_SHARD_BYTES`` of dense fp16 labels, a multiple of every label array's inner chunk.

    For a store made by a job of several ``processes``, at most about N / (``SHARDS_PER_PROCESS`` x
    processes) images (rounded up to the inner chunk, never below one): rank r labels every processes-th
    shard, so few big shards leave ranks idle (ImageNet at R = 8 on 64 GPUs: 79 shards, the busiest rank
    1.64x the mean; now 256 shards, 1.00x). Labels do not depend on the shard size except through the
    teacher batches' composition, and the store records the size, so a resume at another world size keeps it."""
    align = max(chunk_images_for(b) for b in label_row_bytes(kind, k, num_classes))
    per_image = 2 * crops_per_image * num_classes
    ips = max(1, TARGET_SHARD_BYTES // per_image)
    ips = min(ips, MAX_IMAGES_PER_SHARD)
    ips = max(align, ips // align * align)
    # never bigger than the dataset (rounded up to the alignment)
    ips = min(ips, max(align, -(-num_images // align) * align))
    if processes > 1:
        per_process = -(-num_images // (SHARDS_PER_PROCESS * processes))
        ips = min(ips, max(align, -(-per_process // align) * align))
    return ips


def busiest_rank_images(shard_images: list[int], processes: int) -> int:
    """Images the busiest of ``processes`` ranks labels when rank r takes every processes-th of the shards
    (``shard_images``: each shard's image count, in order): what a job's time is set by."""
    return max(sum(shard_images[r::processes]) for r in range(processes)) if shard_images else 0


# ---------------------------------------------------------------------------------- stores


def shard_file_key(array, shard: int) -> str:
    """The store key of image shard ``shard``'s one file of ``array`` (an array of a label store): the chunk
    grid is the shard grid for a sharded array and the chunk (= the shard) for a plain one (windows/flips
    of older stores), so the key names the shard's one file either way."""
    return f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"


def is_local(url: str | os.PathLike) -> bool:
    u = str(url)
    return "://" not in u or u.startswith("file://")


#: 's3:/bucket/x' (one slash): meant as a URL, but a relative local path to os and fsspec alike
_ONE_SLASH_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)")


def local_path(url: str | os.PathLike) -> Path:
    """The local path a store location names (``~`` expanded, ``file://`` decoded); a one-line UserError
    for 's3:/bucket/x', which would otherwise be looked for as a local directory named 's3:'."""
    u = str(url)
    almost = _ONE_SLASH_URL.match(u)
    if almost:
        protocol = almost.group(1)
        raise UserError(f"{u}: a URL needs two slashes after '{protocol}:': write {protocol}://{u[almost.end():]}")
    if u.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(u).path))
    return Path(u).expanduser()


def zarr_store(url: str | os.PathLike, *, read_only: bool):
    """A zarr store for ``url``: local paths and ``file://`` use zarr's LocalStore (atomic
    temp-file + rename writes, see ``storage.writer``); any other fsspec URL uses FsspecStore, after
    ``storage.remote.check_remote`` (one-line errors for credentials, bucket, endpoint; storage
    options from fsspec's configuration, see there)."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    from mealkd.storage.remote import check_remote

    check_remote(str(url))
    try:
        return FsspecStore.from_url(str(url), read_only=read_only)
    except (ImportError, ValueError) as err:
        raise UserError(f"{url}: cannot open this URL with fsspec ({err}); use a local path or an fsspec URL whose backend is installed") from None


def open_group(url: str, *, read_only: bool):
    """Open ``url`` as a mealkd group; UserError if it is not one or its version is unknown."""
    import zarr

    missing = f"{url}: not a mealkd label store (nothing there); pass the output path of `mealkd precompute`"
    if is_local(url) and not local_path(url).exists():
        raise UserError(missing)
    try:
        group = zarr.open_group(zarr_store(url, read_only=read_only), mode="r" if read_only else "r+")
    except UserError:
        raise
    except (FileNotFoundError, json.JSONDecodeError, ValueError, KeyError, TypeError) as err:
        if is_local(url) and local_path(url).is_dir() and not (local_path(url) / "zarr.json").exists():
            raise UserError(f"{url}: not a mealkd label store (a directory without zarr.json); pass the output path of `mealkd precompute`") from None
        raise UserError(f"{url}: not a mealkd label store ({type(err).__name__}: {err}); pass the output path of `mealkd precompute`") from None
    except Exception as err:  # zarr's GroupNotFoundError / NodeTypeValidationError etc.
        raise UserError(f"{url}: not a mealkd label store (no Zarr group: {type(err).__name__}); pass the output path of `mealkd precompute`") from None
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise UserError(f"{url}: not a mealkd label store (Zarr group without format={FORMAT!r}); pass the output path of `mealkd precompute`")
    version = attrs.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{url}: unknown label-store version {version!r}; recreate it with `mealkd precompute`")
    if version > VERSION:
        raise UserError(f"{url}: label-store version {version} is newer than this mealkd supports ({VERSION}); upgrade mealkd")
    return group, attrs
