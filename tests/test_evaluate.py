"""`mealkd evaluate`: top-1/top-5 equal a by-hand PyTorch computation on the same images.

Choice of reference: the model is fed, by hand, the tensors of the DALI validation chain
(``core.replay.eval_graph``, one image per run), and top-1/top-5/per-class are counted here with
the class mapping by name. ``evaluate`` must give exactly the same numbers (batching, partial last
batch, skipped unreadable file, class-order mapping, top-k bookkeeping are what it can get wrong).
Separately, the geometry of those DALI tensors (shorter side resized to S/0.875, centre crop S,
ImageNet normalisation) is checked against an independent PIL computation: equal within resampling
noise, and clearly unequal for a crop shifted off centre or a resize without the 0.875 margin.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mealkd.core.dali_io import build_pipeline, resolve_backend, run_batches, to_torch
from mealkd.core.dataset import scan_image_folder
from mealkd.core.replay import FILES, IMAGENET_MEAN, IMAGENET_STD, Normalization, eval_graph
from mealkd.distill.checkpoint import CHECKPOINT_FORMAT
from mealkd.distill.evaluate import evaluate
from mealkd.distill.checkpoint_eval import evaluate_checkpoint
from tests.datagen import make_jpeg_tree

S = 32
MODEL_CLASSES = [f"class_{k}" for k in (6, 3, 0, 5, 1, 4, 2)]  # 7 classes, not in the tree's order
CPU = resolve_backend("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    val = make_jpeg_tree(root / "val", 7, 3, seed=5, min_side=40, max_side=90)
    for k in (0, 4):  # the validation tree has 5 of the model's 7 classes
        for f in (val / f"class_{k}").iterdir():
            f.unlink()
        (val / f"class_{k}").rmdir()
    (val / "class_3" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(MODEL_CLASSES))
    with torch.no_grad():  # non-trivial BN statistics so predictions vary from image to image
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    ckpt = root / "checkpoint.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT, "version": 1, "epoch": 1, "model": model.state_dict(),
            "student_spec": "torchvision:resnet18", "num_classes": len(MODEL_CLASSES), "class_names": MODEL_CLASSES,
            "norm": {"size": S, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        },
        ckpt,
    )
    index = scan_image_folder(val)
    good = [i for i, p in enumerate(index.paths) if "broken" not in p]
    return {"val": val, "ckpt": ckpt, "model": model, "index": index, "good": good}


def dali_eval_tensor(index, i: int) -> torch.Tensor:
    pipe = build_pipeline(eval_graph(Normalization(S), "cpu"), batch_size=1, backend=CPU, num_threads=1)
    feed = {FILES: index.file_feed([i]), "target": [np.array(0, dtype=np.int64)]}
    (tensor,) = list(run_batches(pipe, [feed], lambda outs: to_torch(outs[0], CPU.device)))
    return tensor[0]


def half_up(x: float) -> int:
    """DALI rounds the resized longer side and the centre-crop anchor half up (81 x 37/74 = 40.5 -> 41;
    (37 - 32) / 2 = 2.5 -> 3), where Python's round() and torchvision's CenterCrop round half to even."""
    return int(np.floor(x + 0.5))


def pil_eval_tensor(path, *, shorter: int, offset: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = shorter / min(w, h)
    nw, nh = max(shorter, half_up(w * scale)), max(shorter, half_up(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = half_up((nw - S) * offset[0]), half_up((nh - S) * offset[1])
    pixels = np.asarray(image.crop((left, top, left + S, top + S)), dtype=np.float32) / 255.0
    pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def by_hand(setup) -> dict:
    index, model = setup["index"], setup["model"]
    position = {name: i for i, name in enumerate(MODEL_CLASSES)}
    hits1 = hits5 = 0
    per_class: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in setup["good"]:
            name = index.class_names[index.targets[i]]
            target = position[name]
            logits = model(dali_eval_tensor(index, i)[None])[0]
            top5 = logits.topk(5).indices.tolist()
            hits1 += top5[0] == target
            hits5 += target in top5
            per_class.setdefault(name, []).append(int(top5[0] == target))
    n = len(setup["good"])
    return {"top1": hits1 / n, "top5": hits5 / n, "images": n, "per_class_top1": {k: sum(v) / len(v) for k, v in per_class.items()}}


def test_evaluate_equals_by_hand(setup):
    want = by_hand(setup)
    assert want["images"] == 15
    assert 0 < want["top5"] < 1 and want["top1"] < want["top5"], want  # informative, not saturated
    for batch_size in (4, 64):  # partial last batches, and everything in one batch
        got = evaluate_checkpoint(str(setup["val"]), str(setup["ckpt"]), batch_size=batch_size, device="cpu", per_class=True)
        assert got["images"] == want["images"]
        assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
        assert got["per_class_top1"] == pytest.approx(want["per_class_top1"])


def test_evaluate_cli_json(setup, capsys):
    from mealkd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", "--data", str(setup["val"]), "--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--json", "--batch-size", "8"])
    assert exit_.value.code == 0
    got = json.loads(capsys.readouterr().out)
    want = by_hand(setup)
    assert (got["top1"], got["top5"], got["images"]) == (want["top1"], want["top5"], want["images"])


def test_evaluate_function_with_ids_and_mapping(setup):
    """``evaluate`` on an explicit subset, with the model's own (shuffled) class order."""
    index, model = setup["index"], setup["model"]
    ids = np.array(setup["good"][::2])
    got = evaluate(model, index, MODEL_CLASSES, Normalization(S), CPU, batch_size=3, num_threads=1, ids=ids)
    sub = dict(setup, good=ids.tolist())
    want = by_hand(sub)
    assert (got["top1"], got["top5"], got["images"]) == (want["top1"], want["top5"], want["images"])


def test_eval_geometry_matches_pil(setup):
    """DALI's val tensors = PIL (resize shorter side to round(S/0.875), centre-crop S, normalise)
    up to resampling noise; a one-third off-centre crop or a resize without the margin is far off."""
    index = setup["index"]
    shorter = round(S / 0.875)
    ok, shifted, no_margin = [], [], []
    for i in setup["good"]:
        path = index.root / index.paths[i]
        dali = dali_eval_tensor(index, i)
        ok.append(float((dali - pil_eval_tensor(path, shorter=shorter)).abs().mean()))
        shifted.append(float((dali - pil_eval_tensor(path, shorter=shorter, offset=(0.0, 0.0))).abs().mean()))
        no_margin.append(float((dali - pil_eval_tensor(path, shorter=S)).abs().mean()))
    tolerance = 0.04  # mean |diff| in normalised units (~2.3 grey levels): JPEG decoder + resampler differences
    assert max(ok) < tolerance, ok
    assert np.mean(shifted) > 2 * tolerance and np.mean(no_margin) > 2 * tolerance, (np.mean(ok), np.mean(shifted), np.mean(no_margin))
