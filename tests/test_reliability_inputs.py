"""Bad input and faults, both stages: each ends with ONE line naming the culprit and the fix, exit 2,
no traceback, and nothing marked done that was not written. Odd-but-valid images are handled.

The CLI runs in-process here (``cli.main``: the same entry point, exit code and stderr as a
subprocess, without paying torch's import per case); tests/test_reliability_kill.py covers real
processes and signals.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.datagen import make_jpeg_tree, smooth_image
from tests.test_reliability_common import (
    assert_same_store, assert_user_error, distill_args, precompute_args, run, spawn, store_arrays, tiny_teacher, tiny_world,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    data, teachers = tiny_world(root, seed=5)
    return root, data, teachers


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted store of the base tree (made once, in a subprocess, while other tests run)."""
    root, data, teachers = env
    proc = spawn(*precompute_args(data, teachers, root / "ref.zarr"))

    def get() -> Path:
        if proc.returncode is None:
            out = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[1]
        return root / "ref.zarr"

    return get


def copy_tree(env, tmp_path) -> Path:
    return Path(shutil.copytree(env[1], tmp_path / "data"))


# ------------------------------------------------------------------------------------ bad files
def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(np.random.default_rng(0), 32, 32)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 3]


BAD_FILES = {
    "truncated.jpg": _truncated_jpeg,
    "empty.jpg": lambda: b"",
    "notes.png": lambda: b"these are my notes, not a picture\n" * 20,
    "noise.jpeg": lambda: np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_file_is_named_and_nothing_is_written(env, tmp_path, capsys, reference, name):
    data = copy_tree(env, tmp_path)
    (data / "class_1" / name).write_bytes(BAD_FILES[name]())
    out = tmp_path / "s.zarr"
    proc = run(capsys, *precompute_args(data, env[2], out))
    assert_user_error(proc, f"class_1/{name}", "--skip-bad")
    assert not (out / "zarr.json").exists()  # validation runs before anything is written


def test_skip_bad_excludes_exactly_the_bad_files_and_distill_skips_them(env, tmp_path, capsys):
    data = copy_tree(env, tmp_path)
    for name, make in BAD_FILES.items():
        (data / "class_2" / name).write_bytes(make())
    (data / "class_2" / "scan.gif").write_bytes(b"GIF89a")  # not an image by its extension: left out, and now said so
    out = tmp_path / "s.zarr"
    proc = run(capsys, *precompute_args(data, env[2], out))
    assert_user_error(proc, "4 unreadable", "--skip-bad")
    proc = run(capsys, *precompute_args(data, env[2], out, "--skip-bad"))
    assert proc.returncode == 0, proc.stderr
    assert "1 file(s) that are not images by their extension" in proc.stderr and "class_2/scan.gif" in proc.stderr, proc.stderr
    arrays = store_arrays(out)
    excluded = {p for p, e in zip(arrays["paths"].tolist(), arrays["excluded"]) if e}
    assert excluded == {f"class_2/{n}" for n in BAD_FILES}
    assert all(f"class_2/{n}" in proc.stderr for n in BAD_FILES), proc.stderr  # every one named (only the first was)
    shown = run(capsys, "inspect", str(out))
    assert shown.returncode == 0 and all(n in shown.stdout for n in BAD_FILES), shown.stdout
    listed = json.loads(run(capsys, "inspect", str(out), "--json").stdout)["excluded_paths"]
    assert sorted(listed) == sorted(excluded)
    assert arrays["done"].all() and (arrays["windows"][arrays["excluded"]] == 0).all()
    assert run(capsys, "verify", str(out)).returncode == 0
    proc = run(capsys, *distill_args(out, data, tmp_path / "run", "--epochs", "1"))
    assert proc.returncode == 0, proc.stderr
    for name in BAD_FILES:  # the user's natural clean-up: it read as any other changed tree (put back the junk or recompute)
        (data / "class_2" / name).unlink()
    proc = run(capsys, *distill_args(out, data, tmp_path / "run2", "--epochs", "1"))
    assert_user_error(proc, f"--data {data}: 4 file(s) that {out} excluded as unreadable are gone", "put them back unchanged")


# ------------------------------------------------------------------------------ odd valid images
def _exif_rotated(path: Path, h: int, w: int) -> None:
    img = Image.fromarray(smooth_image(np.random.default_rng(2), h, w))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed: decoded size is (w, h)
    img.save(path, "JPEG", exif=exif.tobytes())


def test_exif_gray_cmyk_png_images_are_handled(env, tmp_path, capsys):
    """EXIF orientation: sizes and windows follow the decoder's orientation; grayscale/CMYK JPEG,
    RGBA/L/P PNG decode to RGB. verify's recomputation proves the stored crops replay exactly."""
    root, _, teachers = env
    data = tmp_path / "odd"
    rng = np.random.default_rng(4)
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    _exif_rotated(data / "a" / "exif.jpg", 20, 36)
    rgb = lambda h, w: smooth_image(rng, h, w)  # noqa: E731
    Image.fromarray(rgb(30, 26)).convert("L").save(data / "a" / "gray.jpg")
    Image.fromarray(rgb(28, 34)).convert("CMYK").save(data / "a" / "cmyk.jpg")
    Image.fromarray(rgb(26, 30)).convert("RGBA").save(data / "b" / "rgba.png")
    Image.fromarray(rgb(32, 24)).convert("L").save(data / "b" / "gray.png")
    Image.fromarray(rgb(24, 24)).convert("P").save(data / "b" / "palette.png")
    Image.fromarray(rgb(30, 30)).save(data / "b" / "plain.jpg")
    t2 = f"{tiny_teacher(root / 'odd1.pt', classes=2, seed=1)},{tiny_teacher(root / 'odd2.pt', classes=2, seed=2)}"
    out = tmp_path / "odd.zarr"
    proc = run(capsys, *precompute_args(data, t2, out))
    assert proc.returncode == 0, proc.stderr
    arrays = store_arrays(out)
    sizes = dict(zip(arrays["paths"].tolist(), arrays["sizes"].tolist()))
    assert sizes["a/exif.jpg"] == [36, 20]  # oriented, not the stored 20 x 36
    assert sizes["a/gray.jpg"] == [30, 26] and sizes["a/cmyk.jpg"] == [28, 34] and sizes["b/palette.png"] == [24, 24]
    assert not arrays["excluded"].any()
    i = arrays["paths"].tolist().index("a/exif.jpg")
    win = arrays["windows"][i]
    assert (win[:, 0] + win[:, 2] <= 36).all() and (win[:, 1] + win[:, 3] <= 20).all()
    proc = run(capsys, "verify", str(out), "--data", str(data), "--teachers", t2, "--sample", "21", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # recomputed crops match the stored rows
    proc = run(capsys, *distill_args(out, data, tmp_path / "run", "--epochs", "1", "--batch-size", "3"))
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------ dataset
def test_empty_class_directory(env, tmp_path, capsys):
    data = copy_tree(env, tmp_path)
    (data / "class_9").mkdir()
    (data / "class_9" / "readme.txt").write_text("no images here")
    assert_user_error(run(capsys, *precompute_args(data, env[2], tmp_path / "s.zarr")), "class_9", "no images")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("change", ["class added", "file rewritten", "file added", "file removed"])
def test_dataset_changed_after_precompute_is_refused_by_distill(env, tmp_path, capsys, reference, change):
    data = copy_tree(env, tmp_path)
    if change == "class added":
        make_jpeg_tree(tmp_path / "extra", classes=4, per_class=1, seed=9)
        shutil.copytree(tmp_path / "extra" / "class_3", data / "class_3")
    elif change == "file rewritten":  # same name, different bytes (and size)
        Image.fromarray(smooth_image(np.random.default_rng(7), 40, 40)).save(data / "class_0" / "img_000.jpg", quality=60)
    elif change == "file added":
        shutil.copy(data / "class_0" / "img_000.jpg", data / "class_0" / "img_100.jpg")
    else:
        (data / "class_1" / "img_001.jpg").unlink()
    proc = run(capsys, *distill_args(reference(), data, tmp_path / "run", "--epochs", "1"))
    named = {"class added": "'class_3/img_000.jpg' is not in the store", "file rewritten": "the same files, but some changed size",
             "file added": "'class_0/img_100.jpg' is not in the store", "file removed": "'class_1/img_001.jpg' of the store is not in the dataset"}
    assert_user_error(proc, f"--data {data}: not the dataset", "fingerprint", named[change], "rerun `mealkd precompute`")  # distill, extend and verify say it alike
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_dataset_difference_names_the_file_and_a_unicode_normalisation():
    from mealkd.storage import dataset_difference

    stored = ["caf\u00e9/a.jpg", "caf\u00e9/b.jpg", "dog/c.jpg"]
    nfd = ["cafe\u0301/a.jpg", "cafe\u0301/b.jpg", "dog/c.jpg"]  # what a copy made on macOS writes
    said = dataset_difference(stored, nfd)
    assert said.startswith("'caf\u00e9/a.jpg' of the store is not in the dataset (2 such files); 'cafe\u0301/a.jpg' is not in the store (2 such")
    assert "Unicode normalisation" in said
    assert dataset_difference(stored, stored[:2]) == "'dog/c.jpg' of the store is not in the dataset"


def test_file_corrupted_in_place_after_precompute_is_named_not_a_traceback(env, tmp_path, reference):
    """A file rewritten in place with the same size (the fingerprint of sizes cannot see it) fails to decode
    during training: one line naming it and the fix, exit 2, no traceback, no checkpoint. A subprocess:
    DALI's executor may crash on a failed batch, which must fail this test, not the suite."""
    data = copy_tree(env, tmp_path)
    victim = sorted((data / "class_1").iterdir())[1]
    victim.write_bytes(np.random.default_rng(3).integers(0, 256, victim.stat().st_size, dtype=np.uint8).tobytes())
    proc = spawn(*distill_args(reference(), data, tmp_path / "run", "--epochs", "1"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert str(victim) in last and "no longer decode" in last and "restore it" in last, last
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_file_removed_while_distill_runs_is_named_not_a_traceback(env, tmp_path, reference):
    """A training file removed after distill checked the dataset (here: after the Trainer is built, before
    it runs): DALI, which reads the files, fails the batch; the loader names the file as unreadable,
    with the OS's reason, and no checkpoint is written."""
    from mealkd.distill.config import DistillConfig
    from mealkd.distill.trainer import Trainer
    from mealkd.errors import UserError

    data = copy_tree(env, tmp_path)
    trainer = Trainer(DistillConfig(labels=str(reference()), data=str(data), student="torchvision:mobilenet_v3_small", init="scratch",
                                    out=str(tmp_path / "run"), epochs=1, batch_size=4, device="cpu", num_threads=1))
    try:
        victim = sorted((data / "class_0").iterdir())[0]
        victim.unlink()
        with pytest.raises(UserError) as err:
            trainer.run()
    finally:
        trainer.close()
    text = str(err.value)
    assert str(victim) in text and "no such file or directory" in text and "can no longer be read" in text and "--resume" in text, text
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("change", ["removed", "rewritten"])
def test_file_removed_or_rewritten_while_precompute_runs_is_named(env, tmp_path, change):
    """Stage one's crop stream (what precompute labels from) after validation: a file removed, or rewritten
    in place with random bytes, fails its DALI batch; the stream names it, with the fix, as one UserError."""
    from mealkd.core.dali_io import resolve_backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.probe import probe_images
    from mealkd.core.replay import Normalization
    from mealkd.core.windows import CropPolicy, draw_all_windows
    from mealkd.errors import UserError
    from mealkd.precompute.crops import CropStream

    data = copy_tree(env, tmp_path)
    index = scan_image_folder(data)
    cpu = resolve_backend("cpu")
    ids = np.arange(len(index))
    sizes, bad = probe_images(index, ids, cpu, num_threads=1)
    assert bad == []
    windows, flips = draw_all_windows(CropPolicy(image_size=16), ids, sizes, 2)
    victim = data / index.paths[5]
    if change == "removed":
        victim.unlink()
    else:
        victim.write_bytes(np.random.default_rng(1).integers(0, 256, victim.stat().st_size, dtype=np.uint8).tobytes())
    stream = CropStream(index, [Normalization(16)], cpu, batch_size=4, num_threads=1)
    with pytest.raises(UserError) as err:
        list(stream.batches(ids.tolist(), ids.tolist(), windows, flips))
    text = str(err.value)
    why = "can no longer be read" if change == "removed" else "no longer decode"
    assert str(victim) in text and why in text and "rerun the same command" in text, text


# ------------------------------------------------------------------------------ store damage
@pytest.mark.parametrize("damage", ["probs deleted", "probs zeroed", "probs truncated", "windows zeroed", "flips deleted"])
def test_damaged_store_is_refused_by_distill_not_read_as_zeros(env, tmp_path, capsys, reference, damage):
    store = Path(shutil.copytree(reference(), tmp_path / "s.zarr"))
    array, how = damage.split()
    chunk = store / array / "c" / "1"
    target = next(p for p in sorted(chunk.rglob("*")) if p.is_file())
    if how == "deleted":
        target.unlink()
    elif how == "zeroed":
        target.write_bytes(b"")
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    proc = run(capsys, *distill_args(store, env[1], tmp_path / "run", "--epochs", "1"))
    assert_user_error(proc, "damaged", "mealkd verify")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ output location
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_output_location(env, tmp_path, capsys):
    target = tmp_path / "ro"
    mounted = _mount_tmpfs(target, "ro,size=64k")
    if not mounted:
        target.chmod(0o555)  # non-root: permissions are enough
    try:
        proc = run(capsys, *precompute_args(env[1], env[2], target / "s.zarr"))
        assert_user_error(proc, str(target), "writable")
    finally:
        _umount(target) if mounted else target.chmod(0o755)


def test_disk_full_during_shard_writes_then_rerun_completes(env, tmp_path, capsys, reference):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "size=88k"):  # create_store needs ~52 KiB of 4 KiB pages, each shard 16 KiB
        pytest.skip("needs root to mount a size-limited tmpfs")
    try:
        out = disk / "s.zarr"
        proc = run(capsys, *precompute_args(env[1], env[2], out))
        assert_user_error(proc, "No space left on device", "rerun")
        arrays, ref = store_arrays(out), store_arrays(reference())
        done = arrays["done"]
        assert 0 < done.sum() < done.size, "the disk should fill up between the first and the last shard"
        for name in ("windows", "flips", "probs"):
            assert np.array_equal(arrays[name][done], ref[name][done])  # done only for what was written
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        proc = run(capsys, *precompute_args(env[1], env[2], out))
        assert proc.returncode == 0, proc.stderr
        assert_same_store(out, reference())
    finally:
        _umount(disk)


def test_disk_full_at_a_distill_checkpoint_then_resume_completes(env, tmp_path, capsys, reference):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "size=64k"):  # metrics.jsonl fits, a mobilenet_v3_small checkpoint does not
        pytest.skip("needs root to mount a size-limited tmpfs")
    try:
        out = disk / "run"
        proc = run(capsys, *distill_args(reference(), env[1], out, "--epochs", "1"))
        assert_user_error(proc, str(out), "checkpoint failed", "--resume")
        assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "metrics.jsonl"]  # no checkpoint, no temp file left (.lock: the run lock)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run(capsys, *distill_args(reference(), env[1], out, "--epochs", "1", "--resume"))
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
        assert (out / "checkpoint.pt").exists()
    finally:
        _umount(disk)


def test_two_precompute_runs_on_one_store(env, tmp_path, reference):
    out = tmp_path / "s.zarr"
    procs = [spawn(*precompute_args(env[1], env[2], out)) for _ in range(2)]
    results = [(p.returncode, o[1]) for p in procs for o in [p.communicate(timeout=300)]]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the loser either waits out nothing (store complete) or is refused
    for rc, err in results:
        if rc == 2:
            assert_user_error(subprocess.CompletedProcess([], rc, "", err), "another mealkd process", "wait")
    assert_same_store(out, reference())


# ------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize(
    "flags, culprit",
    [
        (["--crops-per-image", "0"], "--crops-per-image"),
        (["--crops-per-image", "-3"], "--crops-per-image"),
        (["--image-size", "-16"], "--image-size"),
        (["--image-size", "0"], "--image-size"),
        (["--scale", "0", "1"], "--scale"),
        (["--scale", "0.5", "1.5"], "--scale"),
        (["--scale", "-0.2", "0.9"], "--scale"),
        (["--scale", "0.9", "0.5"], "--scale"),
        (["--ratio", "0", "1"], "--ratio"),
        (["--flip-prob", "1.5"], "--flip-prob"),
        (["--batch-size", "0"], "--batch-size"),
        (["--images-per-shard", "0"], "--images-per-shard"),
        (["--temperature", "0"], "--temperature"),
        (["--encoding", "topk:0"], "encoding"),
    ],
)
def test_bad_precompute_flags(env, tmp_path, capsys, flags, culprit):
    out = tmp_path / "s.zarr"
    args = precompute_args(env[1], env[2], out)
    if flags[0] in args:  # override the default given by precompute_args
        del args[args.index(flags[0]) : args.index(flags[0]) + 2]
    proc = run(capsys, *args, *flags)
    assert_user_error(proc, culprit)
    assert not out.exists() or not (out / "zarr.json").exists()


def test_teachers_with_different_class_counts(env, tmp_path, capsys):
    three, four = tiny_teacher(tmp_path / "three.pt", classes=3), tiny_teacher(tmp_path / "four.pt", classes=4)
    proc = run(capsys, *precompute_args(env[1], f"{three},{four}", tmp_path / "s.zarr"))
    line = assert_user_error(proc, "four.pt", "4")
    assert "classes" in line
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()


def test_nan_teacher_stops_with_nothing_bad_marked_done(env, tmp_path, capsys):
    """A teacher whose output turns NaN on one (white) image: one line naming it; shards before it
    are done and correct, the shard with the white image is not done."""
    data = copy_tree(env, tmp_path)
    Image.fromarray(np.full((30, 30, 3), 255, np.uint8)).save(data / "class_2" / "zz_white.jpg", quality=95)
    good = tiny_teacher(tmp_path / "good.pt", seed=1)
    bad = tiny_teacher(tmp_path / "nan.pt", seed=2, nan_above=2.0)  # white normalises to ~2.2 on average
    out = tmp_path / "s.zarr"
    proc = run(capsys, *precompute_args(data, f"{good},{bad}", out))
    assert_user_error(proc, "nan.pt", "NaN")
    arrays = store_arrays(out)
    white = arrays["paths"].tolist().index("class_2/zz_white.jpg")
    assert not arrays["done"][white] and arrays["done"][: white - 1].all()
    assert np.isfinite(arrays["probs"].astype(np.float32)).all()
