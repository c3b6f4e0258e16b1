"""`mealkd import-fkd`: FKD's label files -> a mealkd store that distill trains from.

Real files throughout: a JPEG ImageFolder (tests/datagen.py), FKD-format label files written here
with ``torch.save`` exactly as FKD's generator writes them (a list of numpy arrays: crop fractions
(i/H, j/W, h/H, w/W) of integer pixel windows, flips, (R, 2, k) top-k indices-as-floats and values;
some files fp16, one with tensors, one pickled under numpy 1's module names), DALI decoding,
a real Zarr store, a `cli.py distill` epoch on the CPU.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mealkd import storage
from mealkd.core.dataset import scan_image_folder
from mealkd.precompute.fkd_format import fractions_to_windows, label_file
from mealkd.precompute.import_fkd import ImportConfig, run_import
from tests.datagen import make_jpeg_tree

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
CLASSES, PER_CLASS, R, K, SIZE = 5, 3, 6, 3, 16
FP16 = {1, 4}  # image ids whose files are saved in fp16 (FKD's --use_fp16)
TENSORS = 7  # this image's file holds torch tensors instead of numpy arrays
NUMPY1 = 9  # this image's file is pickled under numpy 1's module names (numpy.core.multiarray)


def fkd_labels(rng: np.random.Generator, height: int, width: int) -> list[np.ndarray]:
    """One image's labels as FKD's generator saves them: windows drawn in integer pixels, stored as
    fractions (float32), flips, and the top-K of a softmax row as (R, 2, K) float32."""
    i = rng.integers(0, height // 2, R)
    j = rng.integers(0, width // 2, R)
    h = rng.integers(1, height - i + 1)
    w = rng.integers(1, width - j + 1)
    coords = np.stack([i / height, j / width, h / height, w / width], axis=1).astype(np.float32)
    flips = rng.random(R) < 0.5
    logits = rng.normal(size=(R, CLASSES)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1)[:, :K]
    top = np.stack([order.astype(np.float32), np.take_along_axis(probs, order, 1).astype(np.float32)], axis=1)
    return [coords, flips, top]


def save_numpy1(obj, path: Path) -> None:
    """torch.save, then rename numpy 2's module in the pickle to numpy 1's (as files made in 2021 are)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)


def write_fkd_tree(tree: Path, labels_dir: Path, seed: int = 0) -> dict[int, list[np.ndarray]]:
    """LABEL_DIR/<split>/<class>/<stem>.tar for every image of ``tree``; returns id -> saved arrays."""
    index = scan_image_folder(tree)
    rng = np.random.default_rng(seed)
    saved = {}
    for i, rel in enumerate(index.paths):
        with Image.open(tree / rel) as im:
            width, height = im.size
        arrays = fkd_labels(rng, height, width)
        if i in FP16:
            arrays = [np.float16(arrays[0]), arrays[1], np.float16(arrays[2])]
        saved[i] = arrays
        path = labels_dir / tree.name / Path(rel).with_suffix(".tar")
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == TENSORS:
            torch.save([torch.from_numpy(a) for a in arrays], path)
        elif i == NUMPY1:
            save_numpy1(arrays, path)
        else:
            torch.save(arrays, path)
    return saved


def by_hand(coords: np.ndarray, height: int, width: int) -> np.ndarray:
    """The FKD crop box in pixels, written out: Python floats, Python's round() on each edge."""
    out = []
    for fy, fx, fh, fw in coords.tolist():
        top, left = fy * height, fx * width
        y0, x0, y1, x1 = round(top), round(left), round(top + fh * height), round(left + fw * width)
        out.append([y0, x0, y1 - y0, x1 - x0])
    return np.array(out, np.int32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fkd")
    tree = make_jpeg_tree(root / "train", CLASSES, PER_CLASS, seed=3)
    labels = root / "fkd_labels"
    saved = write_fkd_tree(tree, labels)
    store = root / "imported.zarr"
    summary = run_import(ImportConfig(label_dir=str(labels), data=str(tree), out=str(store), teacher_name="test teacher",
                                      image_size=SIZE, num_threads=1, images_per_shard=4))
    assert summary["complete"]
    return {"root": root, "tree": tree, "labels": labels, "saved": saved, "store": store, "index": scan_image_folder(tree)}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    from mealkd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "error:" in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------
# the rounding rule
# ---------------------------------------------------------------------------------------------
def test_rounding_rule_by_hand():
    # H=36, W=40: 0.375*36 = 13.5 rounds half to even -> 14 (int() would give 13); 0.3f*36 = 10.8000004 -> 11;
    # the bottom edge 13.5 + 0.5*36 = 31.5 -> 32, so h = 18; left 0.25*40 = 10, right 10 + 0.6f*40 = 34.0000010 -> 34
    coords = np.array([[0.375, 0.25, 0.5, 0.6], [0.3, 0.0, 0.7, 1.0]], np.float32)
    windows, over = fractions_to_windows(coords, 36, 40)
    assert windows.tolist() == [[14, 10, 18, 24], [11, 0, 25, 40]]
    assert over.tolist() == [0, 0]
    # a fraction stored as just under its pixel: 37/48 in float32 times 48 is 36.99999... -> 37, where int() says 36
    frac = np.float32(37 / 48)
    assert float(frac) * 48 < 37 and int(float(frac) * 48) == 36
    windows, _ = fractions_to_windows(np.array([[frac, 0, 11 / 48, 1]], np.float32), 48, 10)
    assert windows.tolist() == [[37, 0, 11, 10]]
    # one pixel past the border (fp16 error) is clamped and counted; far outside is reported
    windows, over = fractions_to_windows(np.array([[0.5, 0.5, 0.52, 0.5]], np.float16), 50, 50)
    assert windows.tolist() == [[25, 25, 25, 25]] and over.tolist() == [1]


def test_rounding_matches_fkd_crop_in_torchvision_and_pil(world):
    """FKD's RandomResizedCrop_FKD calls resized_crop(img, i*H, j*W, h*H, w*W) with floats on a PIL image:
    its crop is exactly the PIL crop of our stored window, for every file (fp32 and fp16 fractions)."""
    for i, rel in enumerate(world["index"].paths):
        with Image.open(world["tree"] / rel) as im:
            img = im.convert("RGB")
        height, width = img.size[1], img.size[0]
        coords = world["saved"][i][0]
        windows, _ = fractions_to_windows(coords, height, width)
        for (fy, fx, fh, fw), (y, x, h, w) in zip(coords.tolist(), windows.tolist()):
            fkd = TF.crop(img, fy * height, fx * width, fh * height, fw * width)
            ours = img.crop((x, y, x + w, y + h))
            assert np.array_equal(np.asarray(fkd), np.asarray(ours)), (rel, (fy, fx, fh, fw), (y, x, h, w))


# ---------------------------------------------------------------------------------------------
# the imported store
# ---------------------------------------------------------------------------------------------
def test_store_equals_by_hand_conversion(world):
    store = storage.open_store(str(world["store"]), fingerprint=world["index"].fingerprint, class_names=world["index"].class_names)
    assert store.crops_per_image == R and store.topk == K and not store.excluded.any()
    sizes = store.sizes
    idx = np.asarray(store._group["topk_idx"][:])
    val = np.asarray(store._group["topk_val"][:])
    for i, (coords, flips, top) in world["saved"].items():
        height, width = (int(v) for v in sizes[i])
        with Image.open(world["tree"] / world["index"].paths[i]) as im:
            assert im.size == (width, height)
        assert np.array_equal(store.windows[i], by_hand(coords, height, width)), i
        assert np.array_equal(store.flips[i], flips), i
        assert np.array_equal(idx[i], top[:, 0, :].astype(np.int64)), i
        assert np.array_equal(val[i], top[:, 1, :].astype(np.float16)), i
    # decoded rows: the K values at their classes, the rest of the mass spread evenly (FKD's marginal smoothing)
    rows = store.labels(np.array([0, 0]), np.array([0, 1]))
    top = world["saved"][0][2]
    for r in (0, 1):
        v = top[r, 1].astype(np.float16).astype(np.float32)
        assert np.allclose(rows[r, top[r, 0].astype(int)], v)
        rest = np.delete(rows[r], top[r, 0].astype(int))
        assert np.allclose(rest, (1 - v.sum()) / (CLASSES - K))


def test_store_attributes_record_the_import(world):
    a = storage.open_store(str(world["store"])).attrs
    assert a["label_encoding"] == {"kind": "topk", "k": K}
    assert a["crop"]["policy"] == "imported" and a["crop"]["reproducible"] is False and a["crop"]["image_size"] == SIZE
    assert "extend" in a["crop"]["note"]
    (teacher,) = a["teachers"]
    assert teacher["spec"] == "imported:fkd" and teacher["name"] == "test teacher"
    assert teacher["label_dir"] == str(world["labels"].resolve()) and teacher["topk"] == K and teacher["crops_per_image"] == R
    assert a["decoder"]["backend"] == "cpu"
    imp = a["imported"]
    assert imp["format"] == "fkd" and imp["crops_per_image"] == R and imp["topk"] == K and imp["clamped_windows"] == 0
    assert a["fidelity"]["rows"] == 0 and "completed" in a


def test_label_dtype_is_the_files_own(world, tmp_path):
    """FKD's --use_fp16 files hold fp16 arrays: the store records float16 (it said float32, the dtype after
    reading widened them); the test world's files are mixed, and say so."""
    assert storage.open_store(str(world["store"])).attrs["imported"]["label_dtype"] == "mixed: float16, float32"
    labels = tmp_path / "fp16_labels"
    for i, (coords, flips, top) in world["saved"].items():
        path = labels / world["tree"].name / Path(world["index"].paths[i]).with_suffix(".tar")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([np.float16(coords), flips, np.float16(top)], path)
    out = tmp_path / "fp16.zarr"
    run_import(ImportConfig(label_dir=str(labels), data=str(world["tree"]), out=str(out), image_size=SIZE, num_threads=1))
    assert storage.open_store(str(out)).attrs["imported"]["label_dtype"] == "float16"


def test_verify_passes_on_imported_store(world, capsys):
    code, _ = run_main(["verify", str(world["store"])], capsys)
    assert code in (0, None)


def test_distill_trains_one_epoch_from_imported_store(world):
    out = world["root"] / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "distill", "--labels", str(world["store"]), "--data", str(world["tree"]),
         "--student", "torchvision:mobilenet_v3_small", "--init", "scratch", "--out", str(out), "--epochs", "1",
         "--batch-size", "4", "--num-threads", "1", "--device", "cpu"],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "checkpoint.pt").exists()
    record = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(record) == 1 and '"epoch": 1' in record[0]


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def copy_labels(world, tmp_path):
    import shutil

    dst = tmp_path / "labels"
    shutil.copytree(world["labels"], dst)
    return dst


def _target(world, labels: Path, i: int) -> Path:
    return label_file(labels / world["tree"].name, world["index"].paths[i])


@pytest.mark.parametrize("case", ["missing", "garbage", "dict", "outside", "bad-index"])
def test_bad_label_file_is_one_line_then_skip_bad_excludes_it(world, copy_labels, tmp_path, case, capsys):
    victim = 5
    path = _target(world, copy_labels, victim)
    coords, flips, top = world["saved"][victim]
    if case == "missing":
        path.unlink()
    elif case == "garbage":
        path.write_bytes(b"PK\x03\x04 not a torch file")
    elif case == "dict":
        torch.save({"coords": coords}, path)
    elif case == "outside":
        torch.save([coords + np.float32(1.5), flips, top], path)
    else:
        bad = top.copy()
        bad[0, 0, 0] = CLASSES + 3
        torch.save([coords, flips, bad], path)
    base = ["import-fkd", str(copy_labels), "--data", str(world["tree"]), "--num-threads", "1", "--image-size", str(SIZE)]
    code, err = run_main([*base, "--out", str(tmp_path / "a.zarr")], capsys)
    assert_one_line_error(code, err, str(path), "--skip-bad")
    assert not (tmp_path / "a.zarr").exists()
    code, err = run_main([*base, "--out", str(tmp_path / "b.zarr"), "--skip-bad"], capsys)
    assert code in (0, None), err
    store = storage.open_store(str(tmp_path / "b.zarr"))
    assert np.flatnonzero(store.excluded).tolist() == [victim]
    assert store.attrs["imported"]["excluded"]["bad_label_files"] == 1
    code, _ = run_main(["inspect", str(tmp_path / "b.zarr")], capsys)  # its history line counts them (len() of an int crashed)
    assert code in (0, None)


def test_image_size_and_skip_bad_leaving_nothing_to_train_on_are_refused(world, copy_labels, tmp_path, capsys):
    """precompute's guards: --image-size above 4096, and --skip-bad that would exclude every image of a class
    (here: its label files are missing) or every image; one line, no store (both used to be accepted)."""
    base = ["import-fkd", str(copy_labels), "--data", str(world["tree"]), "--num-threads", "1", "--skip-bad"]
    out = tmp_path / "x.zarr"
    code, err = run_main([*base, "--out", str(out), "--image-size", "5000"], capsys)
    assert_one_line_error(code, err, "--image-size 5000", "from 1 to 4096")
    for path in (copy_labels / world["tree"].name / "class_1").iterdir():
        path.unlink()
    code, err = run_main([*base, "--out", str(out), "--image-size", str(SIZE)], capsys)
    assert_one_line_error(code, err, "class 'class_1'", "label file", "nothing to train on")
    for path in (copy_labels / world["tree"].name).glob("*/*.tar"):
        path.unlink()
    code, err = run_main([*base, "--out", str(out), "--image-size", str(SIZE)], capsys)
    assert_one_line_error(code, err, str(world["tree"]), f"none of its {CLASSES * PER_CLASS} image file(s)", "nothing to train on")
    assert not out.exists()


def test_label_dir_without_the_classes(world, tmp_path, capsys):
    (tmp_path / "empty" / "other").mkdir(parents=True)
    code, err = run_main(["import-fkd", str(tmp_path / "empty"), "--data", str(world["tree"]), "--out", str(tmp_path / "x.zarr")], capsys)
    assert_one_line_error(code, err, "LABEL_DIR", "class_0")


def test_rerun_with_other_settings_is_refused(world, capsys):
    code, err = run_main(["import-fkd", str(world["labels"]), "--data", str(world["tree"]), "--out", str(world["store"]),
                          "--image-size", str(SIZE + 1)], capsys)
    assert_one_line_error(code, err, "--image-size", "--out")


def test_rerun_with_another_images_per_shard_is_refused(world, capsys):
    """The store was made with 4 images per shard: a rerun asking for 5 names the flag and both values
    (it used to continue with the store's 4 silently)."""
    code, err = run_main(["import-fkd", str(world["labels"]), "--data", str(world["tree"]), "--out", str(world["store"]),
                          "--image-size", str(SIZE), "--teacher-name", "test teacher", "--images-per-shard", "5"], capsys)
    assert_one_line_error(code, err, "--images-per-shard 5 (the store: 4)", "--out")


def test_kill_during_import_then_rerun_equals_uninterrupted(world, tmp_path):
    out = tmp_path / "killed.zarr"
    args = [sys.executable, str(REPO / "cli.py"), "import-fkd", str(world["labels"]), "--data", str(world["tree"]), "--out", str(out),
            "--teacher-name", "test teacher", "--image-size", str(SIZE), "--num-threads", "1", "--images-per-shard", "4"]
    killed = subprocess.run(args, capture_output=True, text=True, env=dict(ENV, MEALKD_TEST_KILL_AT="shard-before-done:3"), cwd=REPO, timeout=300)
    assert killed.returncode == -9, killed.stderr
    partial = storage.open_store(str(out), require_complete=False)
    assert 0 < partial.done.sum() < partial.num_images
    rerun = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    a, b = storage.open_store(str(out)), storage.open_store(str(world["store"]))
    for name in ("paths", "targets", "sizes", "excluded", "windows", "flips", "topk_idx", "topk_val", "done", "fidelity"):
        assert np.array_equal(np.asarray(a._group[name][:]), np.asarray(b._group[name][:])), name
    volatile = {"created", "completed", "store_id", "imported"}
    assert {k: v for k, v in a.attrs.items() if k not in volatile} == {k: v for k, v in b.attrs.items() if k not in volatile}
    assert {k: v for k, v in a.attrs["imported"].items() if k != "label_root"} == {k: v for k, v in b.attrs["imported"].items() if k != "label_root"}


def test_extend_refuses_an_imported_store_in_one_line(world, tmp_path, capsys):
    """Imported crops were not drawn by mealkd's generator: extend cannot add consistent ones."""
    code, err = run_main(["extend", str(world["store"]), "--crops-per-image", str(R + 2), "--out", str(tmp_path / "x.zarr"),
                          "--data", str(world["tree"]), "--teachers", "imported:fkd"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "imported" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "x.zarr").exists()


def test_merge_with_a_seeded_store_says_the_crops_were_imported(world, tmp_path, capsys):
    """An imported store and a precompute store of the same images: one line saying that one store's crops
    were imported (FKD) and cannot match seeded crops (it said 'has crop seed 0 (vs None)'), either order."""
    from tests.test_reliability_common import tiny_teacher

    seeded = tmp_path / "seeded.zarr"
    code, err = run_main(["precompute", "--data", str(world["tree"]), "--teachers", str(tiny_teacher(tmp_path / "t.pt", CLASSES)),
                          "--out", str(seeded), "--crops-per-image", "1", "--image-size", str(SIZE), "--batch-size", "8",
                          "--device", "cpu", "--num-threads", "1"], capsys)
    assert code in (0, None), err
    out = tmp_path / "merged.zarr"
    for stores in ([world["store"], seeded], [seeded, world["store"]]):
        code, err = run_main(["merge", *map(str, stores), "--out", str(out)], capsys)
        assert_one_line_error(code, err, f"{world['store']} holds crops imported from FKD", f"{seeded} crops drawn by", "seed 0")
        assert "vs None" not in err
    assert not out.exists()


def test_inspect_shows_what_the_import_recorded(world, capsys):
    import json as _json

    from mealkd.cli import main
    from mealkd.storage.lineage import describe_lineage

    with pytest.raises(SystemExit):
        main(["inspect", str(world["store"]), "--json"])
    info = _json.loads(capsys.readouterr().out)
    assert info["imported"]["format"] == "fkd" and info["imported"]["crops_per_image"] == R
    (line,) = [text for text in describe_lineage(info) if text.startswith("imported from FKD labels")]
    assert f"{R} crops/image, top-{K}" in line and "not reproducible" in line
