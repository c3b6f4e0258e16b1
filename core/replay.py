"""Crop replay: (image file, window, flip) -> normalised tensor, with the same DALI operators in both stages.

A crop is a window (y, x, h, w) in pixels of the decoded (EXIF-oriented) source image plus a flip
bit. Every operator of the chain is built by ONE function here, used by both stages:
:func:`decode_image` (whole image), :func:`cut_window` (``fn.slice``), :func:`crop_to_tensor`
(resize, mirror, normalise). Stage one decodes an image once and cuts all its crops.

Stage two does the same, with one exception: on the CPU with K = 1 it decodes only the window
(``fn.decoders.image_slice``, much less work per crop), which is bit-identical to decode + slice on
the CPU backend (tests/test_replay.py proves it). On the GPU (``mixed``) stage two always decodes
whole images and slices, like stage one, so a crop's pixels never depend on K; and every mixed
decoder uses the same pinned ``hw_decoder_load`` (:data:`HW_DECODER_LOAD`), so they never depend on
the image's position in its batch either (DALI sends the first part of a batch to the hardware JPEG
engine and the rest to the CUDA decoder).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, types

from mealkd.core.models.spec import IMAGENET_MEAN, IMAGENET_STD



@dataclass(frozen=True)
class Normalization:
    """Model input: square size in pixels and per-channel mean/std in [0, 1] units."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


#: fraction of each batch given to the hardware JPEG decoder on ``mixed`` (DALI's default is 0.65, by
#: batch position). 0 keeps every image on the CUDA decoder: the same pixels whatever the batch. A store
#: records the load its crops were decoded with, and stage two replays with the recorded one.
HW_DECODER_LOAD = 0.0


def recorded_hw_load(decoder_record: dict | None) -> float:
    """The hardware-decoder load a store's ``decoder`` record pins (:data:`HW_DECODER_LOAD` for a CPU-made
    store, which records none)."""
    value = (decoder_record or {}).get("hw_decoder_load")
    return HW_DECODER_LOAD if value is None else float(value)


#: the external source through which every decoding pipeline but validation gets its files: per sample, the
#: file's absolute path as bytes (:meth:`DatasetIndex.file_feed`), read by :func:`read_files`
FILES = "files"


def read_files():
    """The batch's encoded files, read by DALI's own threads (``fn.io.file.read``) from the paths fed as
    :data:`FILES`, several files at once. Reading them in a Python feed thread (one ``np.fromfile`` per
    file) released and retook the GIL once per file, and next to a busy Python thread (the one
    launching the model's kernels) each retake can wait for the interpreter's switch interval: that
    thread built 1 batch of 128 per second instead of ~3,000 (benchmarks/file_reads.py). Plain reads,
    not mmap: no SIGBUS if a file shrinks, and better on network file systems (DALI's note)."""
    paths = fn.external_source(name=FILES, dtype=types.UINT8, batch=True)
    return fn.io.file.read(paths, dont_use_mmap=True)


def decode_image(encoded, decoder: str, hw_load: float = HW_DECODER_LOAD):
    """The whole-image decode of both stages: HWC uint8 RGB, EXIF-oriented; ``hw_load``: the share of
    each batch ``mixed`` gives to the hardware JPEG engine (ignored on the CPU)."""
    extra = {"hw_decoder_load": float(hw_load)} if decoder == "mixed" else {}
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **extra)


def cut_window(image, anchor, shape):
    """The crop of both stages: the stored (y, x) anchor and (h, w) shape, never out of bounds."""
    return fn.slice(image, anchor, shape, axis_names="HW", out_of_bounds_policy="error")


def decodes_window_only(decoder: str, crops_per_sample: int) -> bool:
    """Whether stage two may decode just the window (CPU, K = 1): bit-identical there, not proven on GPU."""
    return decoder == "cpu" and crops_per_sample == 1


def window_feed(windows: np.ndarray, flips: np.ndarray, suffix: str = "") -> dict[str, np.ndarray]:
    """A batch of crops as the external-source feed :func:`cut_graph` and :func:`replay_graph` read:
    per crop its (y, x) anchor, (h, w) shape and flip bit, named ``anchor{suffix}`` etc.

    Each is one array with the batch on its first axis: DALI takes it in one call, where lists of
    per-crop arrays took 4.5 vs 1.2 ms per 128 crops (feed + run, benchmarks/feeds.py) on the thread
    that also launches the teachers."""
    windows = np.asarray(windows, dtype=np.int32)
    return {
        f"anchor{suffix}": np.ascontiguousarray(windows[:, :2]),
        f"shape{suffix}": np.ascontiguousarray(windows[:, 2:]),
        f"flip{suffix}": np.ascontiguousarray(flips, dtype=np.int32),
    }


def crop_to_tensor(crop, flip, norm: Normalization):
    """The shared tail of the chain: resize the window to size x size, mirror, normalise, CHW float."""
    resized = fn.resize(crop, size=[norm.size, norm.size], interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(
        resized,
        mirror=flip,
        mean=[255.0 * m for m in norm.mean],
        std=[255.0 * s for s in norm.std],
        output_layout="CHW",
        dtype=types.FLOAT,
    )


def decode_graph(decoder: str, hw_load: float = HW_DECODER_LOAD):
    """Stage one, part 1: decode whole images once (outputs HWC uint8 RGB)."""

    def graph():
        return decode_image(read_files(), decoder, hw_load)

    return graph


def cut_graph(norms: list[Normalization], on_gpu: bool):
    """Stage one, part 2: cut stored windows from decoded images, one output per normalisation."""

    def graph():
        # On CPU the R crops of an image are fed as R references to one decoded array: no_copy keeps
        # DALI from copying it R times (run_batches holds each feed until its outputs are taken).
        # On GPU the copies are device-to-device and the path was verified bit-identical as it is.
        image = fn.external_source(name="image", layout="HWC", dtype=types.UINT8, device="gpu" if on_gpu else "cpu", batch=True,
                                   no_copy=not on_gpu)
        anchor = fn.external_source(name="anchor", dtype=types.INT32, batch=True)
        shape = fn.external_source(name="shape", dtype=types.INT32, batch=True)
        flip = fn.external_source(name="flip", dtype=types.INT32, batch=True)
        crop = cut_window(image, anchor, shape)
        return tuple(crop_to_tensor(crop, flip, norm) for norm in norms)

    return graph


def replay_graph(norm: Normalization, decoder: str, crops_per_sample: int, label_dtype=types.FLOAT, with_classes: bool = False,
                 hw_load: float = HW_DECODER_LOAD):
    """Stage two: per sample, the encoded file, K windows + flips and K label rows (``hw_load``: the
    store's recorded hardware-decoder load, :func:`recorded_hw_load`).

    K > 1 (and K = 1 on the GPU) decodes once and slices K times (FKD's multi-crop); K = 1 on the
    CPU decodes only the window (``image_slice``). Outputs: K image batches, then the labels (K, C) per sample, then (``with_classes``)
    the image's dataset class repeated per crop, (K,) int64, fed as ``classes``.
    """

    def graph():
        encoded = read_files()
        labels = fn.external_source(name="labels", dtype=label_dtype, batch=True)
        extra = (fn.external_source(name="classes", dtype=types.INT64, batch=True),) if with_classes else ()
        crops = []
        if decodes_window_only(decoder, crops_per_sample):
            anchor = fn.external_source(name="anchor0", dtype=types.INT32, batch=True)
            shape = fn.external_source(name="shape0", dtype=types.INT32, batch=True)
            flip = fn.external_source(name="flip0", dtype=types.INT32, batch=True)
            window = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", device=decoder, output_type=types.RGB)
            crops.append(crop_to_tensor(window, flip, norm))
        else:
            image = decode_image(encoded, decoder, hw_load)
            for k in range(crops_per_sample):
                anchor = fn.external_source(name=f"anchor{k}", dtype=types.INT32, batch=True)
                shape = fn.external_source(name=f"shape{k}", dtype=types.INT32, batch=True)
                flip = fn.external_source(name=f"flip{k}", dtype=types.INT32, batch=True)
                crops.append(crop_to_tensor(cut_window(image, anchor, shape), flip, norm))
        return (*crops, labels, *extra)

    return graph


def probe_graph(decoder: str):
    """Validation: the header shape (``peek_image_shape``) and the decoded shape of each file. Fed the files'
    bytes (``encoded``), read in Python: a file that cannot be read is then named with the OS's reason."""

    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True)
        decoded = decode_image(encoded, decoder)
        return fn.peek_image_shape(encoded), decoded.shape()

    return graph


#: ``--interpolation`` name -> DALI filter of the validation resize (antialiased when shrinking, like PIL and
#: torchvision's ``Resize(antialias=True)``)
EVAL_INTERPOLATIONS = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def eval_resize_shorter(size: int, crop_pct: float = 0.875, resize_size: int | None = None) -> int:
    """The validation rule: the shorter side is resized to ``resize_size`` if given, else to
    ``round(size / crop_pct)`` (224 / 0.875 = 256; Python's round, half to even), then ``size`` x ``size``
    is cut from the centre. timm computes floor(size / crop_pct): 1 px less where the fraction is >= .5
    (224 / 0.95 = 235.8: timm 235, here 236); pass ``resize_size`` to match it exactly."""
    return int(resize_size) if resize_size is not None else int(round(size / crop_pct))


def eval_graph(norm: Normalization, decoder: str, crop_pct: float = 0.875, *, resize_size: int | None = None,
               interpolation: str = "bilinear"):
    """Validation pipeline: resize the shorter side to :func:`eval_resize_shorter` with ``interpolation``
    (antialiased), centre-crop norm.size x norm.size, normalise."""
    shorter = eval_resize_shorter(norm.size, crop_pct, resize_size)
    interp = EVAL_INTERPOLATIONS[interpolation]

    def graph():
        target = fn.external_source(name="target", dtype=types.INT64, batch=True)
        image = decode_image(read_files(), decoder)
        image = fn.resize(image, resize_shorter=shorter, interp_type=interp, antialias=True)
        image = fn.crop_mirror_normalize(
            image,
            crop=(norm.size, norm.size),
            mean=[255.0 * m for m in norm.mean],
            std=[255.0 * s for s in norm.std],
            output_layout="CHW",
            dtype=types.FLOAT,
        )
        return image, target

    return graph
