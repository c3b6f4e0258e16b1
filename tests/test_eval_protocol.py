"""The validation protocol (issue 12 item 7): ``--resize-size``, ``--crop-pct``, ``--interpolation``.

References computed here, independently of mealkd:

- geometry: images whose red channel is x + 1 and green channel y + 1 (exact in 8 bits, lossless PNG).
  Any normalised resampling filter reproduces a linear ramp, so a straight-line fit of the output's
  red (green) profile gives the scale and the first kept source column (row) of the DALI chain. They
  must match the rule worked out by hand the way torchvision does it (``Resize(R)``: shorter side R,
  longer side ``int(R * long / short)``; ``CenterCrop(S)``: anchor ``int(round((side - S) / 2))``):
  within 0.25 px on the shorter axis, within 1 px on the longer one (DALI rounds the resized longer
  side and the anchor half up; documented);
- pixels: DALI's bilinear and bicubic outputs of a noise image against torchvision's
  ``Resize(232, BILINEAR|BICUBIC, antialias=True)`` + ``CenterCrop(224)`` (square image: no rounding
  difference), each close to its own filter and far from the other;
- accuracy: `mealkd evaluate --resize-size ... --interpolation bicubic` equals a by-hand run of the
  model on tensors of the DALI chain built with the same protocol, one image at a time; the protocol
  changes the model's predictions, so a flag that was ignored would fail.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mealkd.core.dali_io import build_pipeline, resolve_backend, run_batches, to_torch
from mealkd.core.dataset import scan_image_folder
from mealkd.core.replay import FILES, IMAGENET_MEAN, IMAGENET_STD, Normalization, eval_graph
from mealkd.distill.checkpoint import CHECKPOINT_FORMAT
from mealkd.distill.evaluate import EvalProtocol, evaluate
from mealkd.distill.checkpoint_eval import evaluate_checkpoint
from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import assert_user_error, run

CPU = resolve_backend("cpu")
GREY = Normalization(224, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # output in grey levels


def png_bytes(pixels: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def dali_tensor(encoded: np.ndarray, size: int, protocol: EvalProtocol, norm: Normalization | None = None) -> torch.Tensor:
    norm = norm or Normalization(size, mean=GREY.mean, std=GREY.std)
    graph = eval_graph(norm, "cpu", protocol.crop_pct, resize_size=protocol.resize_size, interpolation=protocol.interpolation)
    pipe = build_pipeline(graph, batch_size=1, backend=CPU, num_threads=1)
    with tempfile.TemporaryDirectory() as tmp:  # the pipeline reads files (core.replay.read_files)
        path = Path(tmp) / "image"
        encoded.tofile(path)
        feed = {FILES: [np.frombuffer(os.fsencode(path), np.uint8)], "target": [np.array(0, dtype=np.int64)]}
        (tensor,) = list(run_batches(pipe, [feed], lambda outs: to_torch(outs[0], CPU.device)))
    return tensor[0]


def ramp(width: int, height: int) -> np.ndarray:
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    pixels[..., 0] = (np.arange(width) + 1)[None, :]
    pixels[..., 1] = (np.arange(height) + 1)[:, None]
    return pixels


def fitted(profile: np.ndarray, source_len: int) -> tuple[float, float]:
    """(resized length, first kept column) from a ramp profile: value = 1 + x_src, x_src = (anchor + j + 0.5) / scale - 0.5."""
    j = np.arange(4, len(profile) - 4)
    slope, intercept = np.polyfit(j, profile[j], 1)
    return source_len / slope, (intercept - 0.5) / slope - 0.5


def torchvision_geometry(width: int, height: int, size: int, shorter: int) -> dict[str, tuple[int, int]]:
    """Resized length and centre-crop anchor per axis, as torchvision's Resize(shorter) + CenterCrop(size) compute them."""
    short, long_ = min(width, height), max(width, height)
    new_long = int(shorter * long_ / short)
    new_w, new_h = (shorter, new_long) if width <= height else (new_long, shorter)
    return {"x": (new_w, int(round((new_w - size) / 2.0))), "y": (new_h, int(round((new_h - size) / 2.0)))}


CASES = [  # (crop size S, protocol, the shorter side the rule gives)
    (224, EvalProtocol.from_flags(resize_size=232), 232),                                 # torchvision V2 weights
    (224, EvalProtocol.from_flags(crop_pct=0.95, interpolation="bicubic"), 236),          # timm-style crop_pct
    (224, EvalProtocol(), 256),                                                           # the default, 0.875
    (64, EvalProtocol.from_flags(resize_size=72, interpolation="bicubic"), 72),           # a strong (antialiased) downscale
    (64, EvalProtocol.from_flags(crop_pct=0.8), 80),
]


@pytest.mark.parametrize("width,height", [(253, 240), (240, 252), (245, 245)])
def test_geometry_is_the_rule(width, height):
    encoded = png_bytes(ramp(width, height))
    for size, protocol, shorter in CASES:
        assert protocol.resize_for(size) == shorter
        out = dali_tensor(encoded, size, protocol).numpy()
        assert out.shape == (3, size, size)
        want = torchvision_geometry(width, height, size, shorter)
        for axis, profile, source_len in (("x", out[0].mean(axis=0), width), ("y", out[1].mean(axis=1), height)):
            new, anchor = fitted(profile, source_len)
            want_new, want_anchor = want[axis]
            tolerance = 0.25 if source_len == min(width, height) else 1.0
            where = f"{width}x{height} S={size} {protocol} axis {axis}: resized {new:.2f} anchor {anchor:.2f}, want {want_new} / {want_anchor}"
            assert abs(new - want_new) <= tolerance and abs(anchor - want_anchor) <= tolerance, where


def test_interpolation_is_the_named_filter():
    """Bicubic and bilinear give different pixels, each close to torchvision's filter of the same name."""
    rng = np.random.default_rng(0)
    noise = np.kron(rng.integers(0, 256, (100, 100, 3)), np.ones((3, 3, 1))).astype(np.uint8)  # 300 x 300, 3-px blocks
    encoded, image = png_bytes(noise), Image.fromarray(noise)
    dali, ref = {}, {}
    for name, mode in (("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)):
        dali[name] = dali_tensor(encoded, 224, EvalProtocol.from_flags(resize_size=232, interpolation=name))
        ref[name] = T.Compose([T.PILToTensor(), T.Resize(232, interpolation=mode, antialias=True), T.CenterCrop(224)])(image).float()
    diff = lambda a, b: float((a - b).abs().mean())  # noqa: E731 - mean |difference| in grey levels
    assert diff(dali["bilinear"], dali["bicubic"]) > 3.0
    for name, other in (("bilinear", "bicubic"), ("bicubic", "bilinear")):
        assert diff(dali[name], ref[name]) < 1.0 < 3.0 < diff(dali[name], ref[other]), (name, diff(dali[name], ref[name]), diff(dali[name], ref[other]))


def test_rule_and_flag_errors(capsys):
    assert EvalProtocol().resize_for(224) == 256 and EvalProtocol().resize_for(32) == round(32 / 0.875) == 37
    assert EvalProtocol.from_flags(crop_pct=0.9).resize_for(224) == round(224 / 0.9) == 249
    assert EvalProtocol.from_flags() == EvalProtocol() and EvalProtocol.from_flags(interpolation="BICUBIC").interpolation == "bicubic"
    record = EvalProtocol.from_flags(resize_size=232).describe(224)
    assert record == {"crop_size": 224, "resize_shorter": 232, "resize_size": 232, "crop_pct": 0.875, "interpolation": "bilinear"}
    data, ckpt = "unused-val", "unused.pt"
    for args, needles in (
        (("--resize-size", "232", "--crop-pct", "0.9"), ("--resize-size 232", "--crop-pct", "one of")),
        (("--crop-pct", "0"), ("--crop-pct 0", "(0, 1]")),
        (("--crop-pct", "1.5"), ("--crop-pct 1.5", "(0, 1]")),
        (("--crop-pct", "nan"), ("--crop-pct nan",)),
        (("--resize-size", "0"), ("--resize-size 0", "positive")),
    ):
        assert_user_error(run(capsys, "evaluate", "--data", data, "--checkpoint", ckpt, *args), *needles)
    proc = run(capsys, "evaluate", "--data", data, "--checkpoint", ckpt, "--interpolation", "nearest")
    assert proc.returncode == 2 and "--interpolation" in proc.stderr  # click's choice check
    help_text = " ".join(run(capsys, "evaluate", "--help").stdout.split())
    for phrase in ("--resize-size", "round(S / --crop-pct)", "Default 0.875", "bicubic", "232"):
        assert phrase in help_text, phrase


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 6-class validation tree (JPEG, 40-90 px) and a mealkd checkpoint of a resnet18 whose BatchNorm
    statistics are randomised, so its predictions vary from image to image (and with the pixels)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protocol")
    val = make_jpeg_tree(root / "val", 6, 4, seed=8, min_side=40, max_side=90)
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=6)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    index = scan_image_folder(val)
    ckpt = root / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "epoch": 1, "model": model.state_dict(), "student_spec": "torchvision:resnet18",
                "num_classes": 6, "class_names": index.class_names, "norm": {"size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}},
               ckpt)
    return {"val": val, "ckpt": ckpt, "model": model, "index": index}


def by_hand(world, protocol: EvalProtocol) -> tuple[dict, list[int]]:
    index, model = world["index"], world["model"]
    norm = Normalization(32, IMAGENET_MEAN, IMAGENET_STD)
    hits1 = hits5 = 0
    predictions = []
    with torch.no_grad():
        for i in range(len(index)):
            logits = model(dali_tensor(index.read_bytes(i), 32, protocol, norm)[None])[0]
            top5 = logits.topk(5).indices.tolist()
            predictions.append(top5[0])
            hits1 += top5[0] == int(index.targets[i])
            hits5 += int(index.targets[i]) in top5
    n = len(index)
    return {"top1": hits1 / n, "top5": hits5 / n, "images": n}, predictions


def test_evaluate_with_protocol_equals_by_hand(world, capsys):
    protocol = EvalProtocol.from_flags(resize_size=48, interpolation="bicubic")
    want, predictions = by_hand(world, protocol)
    _, default_predictions = by_hand(world, EvalProtocol())
    assert predictions != default_predictions, "the protocol does not change any prediction: this test could not see it ignored"
    proc = run(capsys, "evaluate", "--data", str(world["val"]), "--checkpoint", str(world["ckpt"]), "--device", "cpu", "--json",
               "--batch-size", "5", "--resize-size", "48", "--interpolation", "bicubic")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["top1"], got["top5"], got["images"]) == (want["top1"], want["top5"], want["images"])
    assert got["protocol"] == {"crop_size": 32, "resize_shorter": 48, "resize_size": 48, "crop_pct": 0.875, "interpolation": "bicubic"}
    # the function `distill --val` calls, with the same protocol
    index = world["index"]
    direct = evaluate(world["model"], index, index.class_names, Normalization(32), CPU, batch_size=7, num_threads=1, protocol=protocol)
    assert (direct["top1"], direct["top5"]) == (want["top1"], want["top5"])
    # crop_pct with --image-size: S = 40, shorter side round(40 / 0.5) = 80
    got = evaluate_checkpoint(str(world["val"]), str(world["ckpt"]), image_size=40, device="cpu",
                              protocol=EvalProtocol.from_flags(crop_pct=0.5))
    assert got["protocol"]["resize_shorter"] == 80 == round(40 / 0.5) and math.isclose(got["protocol"]["crop_pct"], 0.5)
    # a resize smaller than the crop is refused in one line
    proc = run(capsys, "evaluate", "--data", str(world["val"]), "--checkpoint", str(world["ckpt"]), "--device", "cpu", "--resize-size", "30")
    assert_user_error(proc, "--resize-size 30", "less than the 32 px crop")
