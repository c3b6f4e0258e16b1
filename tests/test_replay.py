"""Crop windows and crop replay (docs/architecture.md, section 5).

* ``core.windows.draw_windows`` reproduces torchvision ``RandomResizedCrop`` semantics and is a pure
  function of (seed, image, crop): independent of how many crops are drawn or how images are batched.
* Stage one's decode-once crop stream (``precompute.crops.CropStream``) yields tensors bit-identical
  to stage two's replay (``core.replay.replay_graph``: K=1 via ``decoders.image_slice``, K>1 via
  decode + slice) for the same windows, flips and normalisations, on the CPU backend.
* The pixels are the window the store says: a PIL crop of the (EXIF-oriented) image at (y, x, h, w),
  resized and flipped, matches the DALI tensor to JPEG-decoder precision, while the transposed or
  unflipped alternative does not.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mealkd.core.dali_io import Backend, build_pipeline, run_batches, to_torch
from mealkd.core.dataset import scan_image_folder
from mealkd.core.probe import probe_images
from mealkd.core.replay import FILES, Normalization, replay_graph
from mealkd.core.windows import ATTEMPTS, DRAWS_PER_CROP, CropPolicy, _draws, draw_all_windows, draw_windows
from mealkd.precompute.crops import CropStream
from tests.datagen import make_jpeg_tree, smooth_image

CPU = Backend(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------
def torchvision_get_params(height: int, width: int, scale, ratio, u: np.ndarray) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params, line by line, with its torch random
    numbers replaced by the uniform draws ``u`` (one crop's block: (scale, log-ratio, top, left) per
    attempt). ``torch.randint(0, n + 1)`` is taken as ``floor(u * (n + 1))``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        us, ur, ut, ul = u[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * us)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(math.floor(ut * (height - h + 1)))
            j = int(math.floor(ul * (width - w + 1)))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


SIZES = [(375, 500), (500, 375), (32, 32), (24, 47), (7, 300), (300, 7), (1, 1), (2, 900), (1000, 3), (48, 24)]
POLICIES = [
    CropPolicy(image_size=224),
    CropPolicy(image_size=32, scale=(0.35, 1.0), seed=5),
    CropPolicy(image_size=32, scale=(0.5, 0.5), ratio=(1.0, 1.0), seed=11),
    CropPolicy(image_size=32, scale=(0.01, 0.2), ratio=(0.2, 5.0), seed=123456789),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"scale{p.scale}-ratio{tuple(round(r, 2) for r in p.ratio)}")
def test_windows_follow_torchvision_algorithm(policy):
    """Same draws -> the same (y, x, h, w) as torchvision's get_params, including the fallback."""
    crops = 12
    for image_index, (height, width) in enumerate(SIZES):
        windows, _ = draw_windows(policy, image_index, height, width, crops)
        u = _draws(policy.seed, image_index, crops)
        expected = [torchvision_get_params(height, width, policy.scale, policy.ratio, u[c]) for c in range(crops)]
        assert windows.dtype == np.int32 and windows.shape == (crops, 4)
        assert windows.tolist() == [list(e) for e in expected], (height, width)


@pytest.mark.parametrize("policy", POLICIES[:2])
def test_windows_in_bounds_and_within_scale_and_ratio(policy):
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(1, 600, size=(300, 2)), np.array(SIZES)]).astype(np.int32)
    ids = np.arange(len(sizes)) * 7 + 3
    windows, flips = draw_all_windows(policy, ids, sizes, 6)
    y, x, h, w = (windows[..., k].astype(np.int64) for k in range(4))
    H, W = sizes[:, None, 0].astype(np.int64), sizes[:, None, 1].astype(np.int64)
    assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y + h <= H).all() and (x + w <= W).all()
    from mealkd.core.windows import _centre_fallback

    centre = np.array([_centre_fallback(hh, ww, policy.ratio) for hh, ww in sizes.tolist()])[:, None, :]
    fallback = (windows == centre).all(axis=-1)  # (a sampled window that happens to equal it is skipped too)
    sampled = ~fallback
    moderate = ((W / H >= 0.5) & (W / H <= 2) & (H * W >= 400)).repeat(6, axis=1)
    assert sampled[moderate].mean() > 0.95  # ordinary images almost never fall back
    # Rounding h and w to integers moves area and aspect a little: allow one pixel either way.
    area_hi = (h + 1) * (w + 1) / (H * W)
    area_lo = np.maximum(h - 1, 0) * np.maximum(w - 1, 0) / (H * W)
    assert (area_hi[sampled] >= policy.scale[0]).all() and (area_lo[sampled] <= policy.scale[1]).all()
    assert ((w + 1) / np.maximum(h - 1, 1e-9) >= policy.ratio[0])[sampled].all()
    assert ((w - 1) / (h + 1) <= policy.ratio[1])[sampled].all()
    big = sampled & (h >= 20) & (w >= 20)  # where rounding is negligible, the ranges hold tightly
    assert big.sum() > 100
    frac = h * w / (H * W)
    assert frac[big].min() >= policy.scale[0] * 0.9 and frac[big].max() <= policy.scale[1] * 1.1
    assert (w / h)[big].min() >= policy.ratio[0] * 0.9 and (w / h)[big].max() <= policy.ratio[1] * 1.1


def test_centre_fallback_for_extreme_aspect_images():
    policy = CropPolicy(image_size=32)
    # Wide: 10 x 400 can fit no crop of area >= 8% with ratio <= 4/3 -> centre crop h=10, w=round(13.33)=13.
    windows, _ = draw_windows(policy, 0, 10, 400, 8)
    assert windows.tolist() == [[0, (400 - 13) // 2, 10, 13]] * 8
    # Tall: 400 x 10 -> w=10, h=round(10 / (3/4))=13.
    windows, _ = draw_windows(policy, 1, 400, 10, 8)
    assert windows.tolist() == [[(400 - 13) // 2, 0, 13, 10]] * 8
    # A ratio range that contains the image's own aspect but no attempt fits -> the whole image.
    tight = CropPolicy(image_size=32, scale=(1.0, 1.0), ratio=(0.5, 2.0))
    windows, _ = draw_windows(tight, 2, 300, 500, 50)
    # scale 1 fits an attempt only when its aspect rounds to the image's own; otherwise the whole image
    whole = (windows == np.array([0, 0, 300, 500])).all(axis=1)
    assert whole.mean() > 0.8
    assert (windows[:, 2] * windows[:, 3] >= 0.99 * 300 * 500).all()


def test_windows_distribution_matches_torchvision_random_resized_crop():
    """Two-sample KS on h, w, y, x: ours vs torchvision's own get_params (torch RNG) on 400x300."""
    from torchvision.transforms import RandomResizedCrop

    n, height, width = 4000, 300, 400
    policy = CropPolicy(image_size=224, seed=3)
    ours = np.concatenate([draw_windows(policy, i, height, width, 8)[0] for i in range(n // 8)]).astype(np.float64)
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(img, list(policy.scale), list(policy.ratio)) for _ in range(n)], dtype=np.float64)

    def ks(a, b):
        grid = np.union1d(a, b)
        return np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a) - np.searchsorted(np.sort(b), grid, side="right") / len(b)).max()

    critical = 1.95 * math.sqrt(2 / n)  # alpha = 0.001
    for k, name in enumerate("yxhw"):
        assert ks(ours[:, k], theirs[:, k]) < critical, name
    # and a wrong policy is detected by the same statistic (the test can fail)
    wrong = np.concatenate([draw_windows(CropPolicy(224, scale=(0.2, 1.0), seed=3), i, height, width, 8)[0] for i in range(n // 8)])
    assert ks(wrong[:, 2].astype(np.float64), theirs[:, 2]) > critical


def test_flip_probability():
    sizes = np.full((50, 2), 40, np.int32)
    ids = np.arange(50)
    assert not draw_all_windows(CropPolicy(32, flip_prob=0.0), ids, sizes, 8)[1].any()
    assert draw_all_windows(CropPolicy(32, flip_prob=1.0), ids, sizes, 8)[1].all()
    half = draw_all_windows(CropPolicy(32, flip_prob=0.5), ids, sizes, 8)[1]
    assert 0.4 < half.mean() < 0.6
    # the flip bit does not change the windows
    assert np.array_equal(draw_all_windows(CropPolicy(32, flip_prob=0.0), ids, sizes, 8)[0], draw_all_windows(CropPolicy(32, flip_prob=1.0), ids, sizes, 8)[0])


def test_windows_independent_of_crop_count_and_batching():
    policy = CropPolicy(32, seed=9)
    rng = np.random.default_rng(1)
    sizes = rng.integers(16, 200, size=(40, 2)).astype(np.int32)
    ids = np.arange(1000, 1040)
    w10, f10 = draw_all_windows(policy, ids, sizes, 10)
    w3, f3 = draw_all_windows(policy, ids, sizes, 3)
    assert np.array_equal(w10[:, :3], w3) and np.array_equal(f10[:, :3], f3)
    # any batching / order / subset of images gives each image the same windows
    perm = rng.permutation(40)
    parts = [perm[:7], perm[7:8], perm[8:]]
    for part in parts:
        wp, fp = draw_all_windows(policy, ids[part], sizes[part], 10)
        assert np.array_equal(wp, w10[part]) and np.array_equal(fp, f10[part])
    # a window is keyed by the image index and the seed: changing either changes the windows
    assert not np.array_equal(draw_all_windows(policy, ids + 1, sizes, 10)[0], w10)
    assert not np.array_equal(draw_all_windows(CropPolicy(32, seed=10), ids, sizes, 10)[0], w10)
    assert DRAWS_PER_CROP == 4 * ATTEMPTS + 1


# ----------------------------------------------------------------------------------------------
# Replay identity
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory) -> Path:
    """JPEGs of assorted sizes, plus an EXIF-rotated JPEG, a grayscale JPEG and a PNG."""
    root = make_jpeg_tree(tmp_path_factory.mktemp("replay") / "data", classes=2, per_class=3, seed=3, min_side=24, max_side=48)
    rng = np.random.default_rng(0)
    rotated = Image.fromarray(smooth_image(rng, 30, 44))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(root / "class_0" / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(smooth_image(rng, 26, 40)[..., 0]).save(root / "class_1" / "gray.jpg", quality=90)
    Image.fromarray(smooth_image(rng, 33, 29)).save(root / "class_1" / "plain.png")
    return root


NORMS = [Normalization(16), Normalization(24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))]
R = 5


@pytest.fixture(scope="module")
def stage_one(mixed_tree):
    """(index, sizes, windows, flips, {(image, crop): [tensor per norm]}) from the precompute crop stream."""
    index = scan_image_folder(mixed_tree)
    sizes, bad = probe_images(index, np.arange(len(index)), CPU)
    assert bad == []
    rotated = index.paths.index("class_0/rotated.jpg")
    assert sizes[rotated].tolist() == [44, 30]  # EXIF orientation applied: stored 30x44, displayed 44x30
    windows, flips = draw_all_windows(CropPolicy(16, seed=7), np.arange(len(index)), sizes, R)
    assert flips.any() and not flips.all()
    stream = CropStream(index, NORMS, CPU, batch_size=7)  # 7 does not divide R: batches span images
    crops = {}
    for batch in stream.batches(list(range(len(index))), list(range(len(index))), windows, flips):
        assert len(batch.inputs) == len(NORMS)
        for j, (row, crop) in enumerate(zip(batch.rows.tolist(), batch.crops.tolist())):
            crops[(row, crop)] = [t[j].clone() for t in batch.inputs]
    assert len(crops) == len(index) * R
    return index, sizes, windows, flips, crops


def test_prefetched_crop_stream_yields_the_same_batches(stage_one):
    """With its feeds built in a background thread (the GPU default), the crop stream yields the same
    batches in the same order as without, twice in a row on the same pipelines (nothing left in flight)."""
    index, _, windows, flips, crops = stage_one
    ids = list(range(len(index)))
    for prefetch in (True, False):
        stream = CropStream(index, NORMS, CPU, batch_size=7, prefetch=prefetch)
        for _ in range(2):
            got = {}
            for batch in stream.batches(ids, ids, windows, flips):
                for j, (row, crop) in enumerate(zip(batch.rows.tolist(), batch.crops.tolist())):
                    got[(row, crop)] = [t[j] for t in batch.inputs]
            assert got.keys() == crops.keys()
            assert all(torch.equal(a, b) for key in crops for a, b in zip(got[key], crops[key])), prefetch


def replay(index, windows, flips, norm, slots: list[int], batch_size: int = 4) -> list[torch.Tensor]:
    """Stage two's pipeline, fed as distill.loader feeds it; returns one (N, 3, S, S) tensor per slot."""
    k = len(slots)
    pipe = build_pipeline(replay_graph(norm, CPU.decoder, k), batch_size=batch_size, backend=CPU, num_threads=2)
    ids = np.arange(len(index))

    def feeds():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            feed = {FILES: index.file_feed(batch.tolist()), "labels": [np.zeros((k, 3), np.float32) for _ in batch]}
            for j, slot in enumerate(slots):
                feed[f"anchor{j}"] = [np.ascontiguousarray(w[:2]) for w in windows[batch, slot]]
                feed[f"shape{j}"] = [np.ascontiguousarray(w[2:]) for w in windows[batch, slot]]
                feed[f"flip{j}"] = [np.array(f, dtype=np.int32) for f in flips[batch, slot]]
            yield feed

    outs = list(run_batches(pipe, feeds(), lambda o: [to_torch(t, CPU.device) for t in o[:-1]]))
    return [torch.cat([o[j] for o in outs]) for j in range(k)]


@pytest.mark.parametrize("slots", [[0], [3], [1, 2, 4], [4, 0]], ids=lambda s: "K=%d:%s" % (len(s), "-".join(map(str, s))))
def test_precompute_crops_equal_stage_two_replay(stage_one, slots):
    index, _, windows, flips, crops = stage_one
    for n, norm in enumerate(NORMS):
        replayed = replay(index, windows, flips, norm, slots)
        for j, slot in enumerate(slots):
            assert replayed[j].shape == (len(index), 3, norm.size, norm.size)
            assert replayed[j].dtype == torch.float32
            for i in range(len(index)):
                stage1 = crops[(i, slot)][n]
                assert torch.equal(replayed[j][i], stage1), f"image {index.paths[i]} crop {slot} norm {n}: max diff {(replayed[j][i] - stage1).abs().max()}"


def test_replay_identity_can_fail(stage_one):
    """Control: moving a window by one pixel or dropping the flip changes the replayed tensor."""
    index, _, windows, flips, crops = stage_one
    shifted = windows.copy()
    movable = shifted[:, 0, 0] + shifted[:, 0, 2] < np.array([h for h, _ in stage_one[1].tolist()])
    shifted[movable, 0, 0] += 1
    replayed = replay(index, shifted, ~flips, NORMS[0], [0])[0]
    assert all(not torch.equal(replayed[i], crops[(i, 0)][0]) for i in range(len(index)))


def pil_crop(path: Path, window, flip: bool, norm: Normalization) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    y, x, h, w = (int(v) for v in window)
    pixels = np.asarray(image.crop((x, y, x + w, y + h)).resize((norm.size, norm.size), Image.BILINEAR), np.float32) / 255.0
    if flip:
        pixels = pixels[:, ::-1]
    pixels = (pixels - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def test_crops_are_the_stored_window_in_pil_terms(stage_one):
    """The DALI tensor is the (y, x, h, w) window of the EXIF-oriented image, resized then flipped.

    DALI's JPEG decoder and resampler are not PIL's: measured mean |diff| ~0.003 (normalised units,
    i.e. < 1 grey level); a flipped or transposed window is ~0.2 or more away.
    """
    index, sizes, windows, flips, crops = stage_one
    for i in range(len(index)):
        for c in range(R):
            for n, norm in enumerate(NORMS):
                dali = crops[(i, c)][n]
                ref = pil_crop(index.root / index.paths[i], windows[i, c], bool(flips[i, c]), norm)
                assert (dali - ref).abs().mean() < 0.02, (index.paths[i], c, n)
                assert (dali - ref).abs().max() < 0.5, (index.paths[i], c, n)
                assert (dali - ref.flip(-1)).abs().mean() > 0.05 or torch.allclose(ref, ref.flip(-1), atol=0.05)
                y, x, h, w = windows[i, c].tolist()
                if x + h <= sizes[i][1] and y + w <= sizes[i][0] and (h != w or x != y):
                    transposed = pil_crop(index.root / index.paths[i], (x, y, w, h), bool(flips[i, c]), norm)
                    assert (dali - transposed).abs().mean() > 0.05


@pytest.mark.parametrize("ahead", [True, False])
def test_a_loop_stopped_early_leaves_nothing_for_the_next_loop(ahead):
    """A pipeline is reused across epochs and shards: a loop abandoned after one batch (break, an error,
    ``next(iter(...))``) must not leave its scheduled-ahead batch to be yielded by the next loop."""
    from nvidia.dali import fn, types

    pipe = build_pipeline(lambda: fn.external_source(name="x", dtype=types.INT32), batch_size=2, backend=CPU, num_threads=1)

    def feeds(first: int, batches: int):
        return ({"x": [np.array([first + b], np.int32)] * 2} for b in range(batches))

    def values(outs) -> int:
        return int(np.array(outs[0][0])[0])

    first = run_batches(pipe, feeds(0, 3), values, ahead=ahead)
    assert next(first) == 0
    first.close()  # what a break or a dropped iterator does
    assert list(run_batches(pipe, feeds(100, 3), values, ahead=ahead)) == [100, 101, 102]
