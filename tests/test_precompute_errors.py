"""`mealkd precompute` user errors: one line on stderr naming the culprit, exit code 2, no traceback.

Most cases call the CLI entry point in-process (``cli.main``, the same function the console script
runs; any exception other than its ``SystemExit(2)`` fails the test, so a traceback cannot hide);
three run as real ``python cli.py`` subprocesses to check the process-level contract.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mealkd import storage
from mealkd.cli import main as cli_main
from mealkd.precompute.lock import StoreLock
from tests.datagen import make_jpeg_tree
from tests.test_precompute import make_teachers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute_errors")
    data = make_jpeg_tree(root / "data", classes=3, per_class=2, seed=4, min_side=24, max_side=32)
    empty_class = make_jpeg_tree(root / "empty_class", classes=2, per_class=1, seed=5)
    (empty_class / "class_9_empty").mkdir()
    (empty_class / "class_9_empty" / "notes.txt").write_text("not an image")
    corrupt = make_jpeg_tree(root / "corrupt", classes=3, per_class=2, seed=6, min_side=24, max_side=32)
    good = (corrupt / "class_1" / "img_000.jpg").read_bytes()
    (corrupt / "class_1" / "img_001.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    t3 = make_teachers(root / "t3", classes=3)
    t4 = make_teachers(root / "t4", classes=4)
    return {"root": root, "data": data, "empty_class": empty_class, "corrupt": corrupt, "t3": t3, "t4": t4}


def base(files, out: Path, **extra) -> list[str]:
    args = {
        "--data": files["data"], "--teachers": f"torchvision:mobilenet_v3_small@{files['t3']['mobile']}", "--out": out,
        "--crops-per-image": 2, "--image-size": 16, "--batch-size": 4, "--device": "cpu",
    }
    args.update(extra)
    return ["precompute", *[x for k, v in args.items() for x in (k, str(v))]]


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    return exit_info.value.code, capsys.readouterr().err


PROGRESS = re.compile(r"^(validate|teachers) ")  # rich progress bars (final state printed when stderr is not a TTY)
DALI_LOG = re.compile(r"^(\x1b\[[0-9;]*m)?\[ERROR\]")  # DALI's native decoder log (see the note in the report)


def assert_one_line_error(code: int, err: str, *culprits: str) -> None:
    """Exit 2; the error is ONE line, the last one; anything before it is progress output only."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    noise = [line for line in lines[:-1] if not (PROGRESS.match(line) or DALI_LOG.match(line))]
    assert noise == [], err
    for culprit in culprits:
        assert culprit in errors[0], (culprit, errors[0])


CASES = {
    # id: (argument overrides, culprits that the message must name)
    "missing data dir": (lambda f, t: {"--data": t / "no_such_dir"}, lambda f, t: [str(t / "no_such_dir"), "not a directory"]),
    "empty class dir": (lambda f, t: {"--data": f["empty_class"]}, lambda f, t: ["class_9_empty", "no images"]),
    "unknown arch": (lambda f, t: {"--teachers": f"torchvision:resnet999@{f['t3']['resnet']}"}, lambda f, t: ["resnet999"]),
    "missing weights file": (lambda f, t: {"--teachers": f"torchvision:resnet18@{t / 'missing.pth'}"}, lambda f, t: ["--teachers", str(t / "missing.pth")]),
    "missing torchscript file": (lambda f, t: {"--teachers": str(t / "missing.pt")}, lambda f, t: ["--teachers", str(t / "missing.pt"), "does not exist"]),
    "state dict as a bare teacher": (lambda f, t: {"--teachers": str(f["t3"]["mobile"])}, lambda f, t: ["state dict or checkpoint", "torchvision:ARCH@"]),
    "weights path is a directory": (lambda f, t: {"--teachers": f"torchvision:resnet18@{t}"}, lambda f, t: ["--teachers", "is a directory"]),
    "malformed option": (lambda f, t: {"--teachers": f"torchvision:mobilenet_v3_small@{f['t3']['mobile']}:w=abc"}, lambda f, t: ["--teachers", "w=", "'abc'"]),
    "unknown source": (lambda f, t: {"--teachers": "tv:resnet18"}, lambda f, t: ["'tv'"]),
    "empty list entry": (lambda f, t: {"--teachers": f"{f['t3']['script']},,{f['t3']['script']}"}, lambda f, t: ["empty entry #2"]),
    "teacher vs dataset classes": (
        lambda f, t: {"--teachers": f"torchvision:mobilenet_v3_small@{f['t4']['mobile']}"},
        lambda f, t: [f"torchvision:mobilenet_v3_small@{f['t4']['mobile']}", "4 classes", "has 3"],
    ),
    "teachers disagree": (
        lambda f, t: {"--teachers": f"{f['t3']['script']},{f['t4']['script']}"},
        lambda f, t: [str(f["t4"]["script"]), "4 classes"],
    ),
    "weights of another arch": (
        lambda f, t: {"--teachers": f"torchvision:resnet18@{f['t3']['mobile']}"},
        lambda f, t: [str(f["t3"]["mobile"]), "resnet18"],
    ),
    "crops-per-image 0": (lambda f, t: {"--crops-per-image": 0}, lambda f, t: ["--crops-per-image 0"]),
    "negative image size": (lambda f, t: {"--image-size": -16}, lambda f, t: ["--image-size -16"]),
    "zero batch size": (lambda f, t: {"--batch-size": 0}, lambda f, t: ["--batch-size 0"]),
    "negative images per shard": (lambda f, t: {"--images-per-shard": -3}, lambda f, t: ["--images-per-shard -3"]),
    "negative teacher size": (lambda f, t: {"--teachers": f"{f['t3']['script']}:size=-8"}, lambda f, t: ["size="]),
    "scale min 0": (lambda f, t: {"--scale": "0 0.5"}, lambda f, t: ["--scale 0.0 0.5"]),
    "scale max > 1": (lambda f, t: {"--scale": "0.5 1.5"}, lambda f, t: ["--scale 0.5 1.5"]),
    "scale min > max": (lambda f, t: {"--scale": "0.9 0.5"}, lambda f, t: ["--scale 0.9 0.5"]),
    "ratio negative": (lambda f, t: {"--ratio": "-1 2"}, lambda f, t: ["--ratio -1.0 2.0"]),
    "flip prob > 1": (lambda f, t: {"--flip-prob": 1.5}, lambda f, t: ["--flip-prob 1.5"]),
    "temperature 0": (lambda f, t: {"--temperature": 0}, lambda f, t: ["--temperature 0"]),
    "temperature nan": (lambda f, t: {"--temperature": "nan"}, lambda f, t: ["--temperature nan", "finite"]),
    "temperature inf": (lambda f, t: {"--temperature": "inf"}, lambda f, t: ["--temperature inf", "finite"]),
    "ratio inf": (lambda f, t: {"--ratio": "1 inf"}, lambda f, t: ["--ratio 1.0 inf", "finite"]),
    "image size too big": (lambda f, t: {"--image-size": 100000}, lambda f, t: ["--image-size 100000", "4096"]),
    "bad encoding": (lambda f, t: {"--encoding": "sparse"}, lambda f, t: ["sparse"]),
    "corrupt jpeg": (lambda f, t: {"--data": f["corrupt"]}, lambda f, t: ["class_1/img_001.jpg", "--skip-bad"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error(case, files, tmp_path, capsys):
    overrides, culprits = CASES[case]
    out = tmp_path / "store.zarr"
    argv = base(files, out)
    for key, value in overrides(files, tmp_path).items():
        i = argv.index(key) if key in argv else None
        values = str(value).split(" ") if key in ("--scale", "--ratio") else [str(value)]
        if i is None:
            argv += [key, *values]
        else:
            argv[i + 1 : i + 2] = values
    code, err = run_in_process(argv, capsys)
    assert_one_line_error(code, err, *culprits(files, tmp_path))
    assert not storage.store_exists(str(out))  # nothing was created


def test_control_the_base_arguments_work(files, tmp_path, capsys):
    """The same base arguments without the fault succeed (so each error above is the fault's)."""
    out = tmp_path / "ok.zarr"
    code, err = run_in_process(base(files, out), capsys)
    assert code == 0, err
    assert storage.open_store(str(out)).done.all()
    # stderr is not a terminal (a log file): the final line stays one line for a job script's grep (Rich
    # used to hard-wrap it at 80 columns: "store \n/path is complete")
    assert len(f"store {out} is complete") > 60
    assert [line for line in err.splitlines() if line.endswith(f"store {out} is complete")], err


def test_skip_bad_records_excluded_image(files, tmp_path, capsys):
    out = tmp_path / "skip.zarr"
    code, err = run_in_process(base(files, out, **{"--data": files["corrupt"]}) + ["--skip-bad"], capsys)
    assert code == 0, err
    assert "class_1/img_001.jpg" in err and "excluding 1" in err
    store = storage.open_store(str(out))
    bad = store.paths.index("class_1/img_001.jpg")
    assert store.excluded.tolist() == [i == bad for i in range(len(store.paths))]
    assert store.done.all()
    assert not store.windows[bad].any() and store.sizes[bad].tolist() == [0, 0]
    # the start line and the summary count what is labelled: the excluded image has no crop
    n, r = len(store.paths) - 1, store.crops_per_image
    assert f"precompute: {n:,} images x {r} crops = {n * r:,} crops to label" in err, err
    assert f"precompute: {n} images, {n * r} crops labelled by this run" in err, err
    good = ~store.excluded
    assert (store.windows[good][..., 2:] > 0).all()
    probs = np.asarray(store._group["probs"][:], np.float32)
    np.testing.assert_allclose(probs[bad], 1 / 3, atol=1e-3)  # uniform placeholder rows, never trained on
    # the rerun of an existing store does not need --skip-bad to be repeated to find it complete
    code, err = run_in_process(base(files, out, **{"--data": files["corrupt"]}) + ["--skip-bad"], capsys)
    assert code == 0 and "0 images" in err, err


def test_existing_store_with_other_settings_is_refused(files, tmp_path, capsys):
    out = tmp_path / "seeded.zarr"
    code, err = run_in_process(base(files, out, **{"--seed": 1}), capsys)
    assert code == 0, err
    before = {name: np.asarray(storage.open_store(str(out))._group[name][:]) for name in ("windows", "probs", "done")}
    for overrides, what in [({"--seed": 2}, "--seed 2 (the store: 1)"), ({"--temperature": 2.0}, "--temperature 2.0 (the store: 1.0)"),
                            ({"--crops-per-image": 3}, "--crops-per-image 3 (the store: 2"), ({"--images-per-shard": 1}, "--images-per-shard 1 (the store: "),
                            ({"--encoding": "topk:2"}, "--encoding topk:2 (the store: dense)"),
                            ({"--teachers": str(files["t3"]["script"])}, "--teachers: teacher 1 " + str(files["t3"]["script"]))]:
        code, err = run_in_process(base(files, out, **{"--seed": 1, **overrides}), capsys)
        assert_one_line_error(code, err, str(out), what, "other settings", "rerun with the store's values")
    after = {name: np.asarray(storage.open_store(str(out))._group[name][:]) for name in before}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # the same teacher named otherwise (a relative path from another directory, the default weight written out)
    # and the same encoding spelled otherwise are the same settings: the rerun continues (here: finds it complete)
    mobile = Path(files["t3"]["mobile"])
    cwd = os.getcwd()
    try:
        os.chdir(mobile.parent.parent)
        code, err = run_in_process(base(files, out, **{"--seed": 1, "--teachers": f"torchvision:mobilenet_v3_small@{mobile.parent.name}/{mobile.name}:w=1",
                                                       "--encoding": "DENSE"}), capsys)
    finally:
        os.chdir(cwd)
    assert code == 0 and "0 images" in err, err
    # another dataset -> the fingerprint differs -> refused too
    code, err = run_in_process(base(files, out, **{"--seed": 1, "--data": files["corrupt"]}) + ["--skip-bad"], capsys)
    assert_one_line_error(code, err, str(out))


def test_output_path_that_is_not_a_store(files, tmp_path, capsys):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("someone's files")
    code, err = run_in_process(base(files, out), capsys)
    assert_one_line_error(code, err, str(out))
    assert (out / "keep.txt").read_text() == "someone's files"
    as_file = tmp_path / "a_file.zarr"
    as_file.write_text("x")
    code, err = run_in_process(base(files, as_file), capsys)
    assert_one_line_error(code, err, str(as_file))
    assert as_file.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# real processes
# ----------------------------------------------------------------------------------------------
def test_cli_processes_one_line_errors(files, tmp_path):
    """`python cli.py precompute` as a process: missing data dir, corrupt JPEG, and a second run on a
    store that another run holds locked (the lock is held here by the runner's own StoreLock)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    locked = tmp_path / "locked.zarr"
    runs = {
        "missing": (base(files, tmp_path / "a.zarr", **{"--data": tmp_path / "nope"}), [str(tmp_path / "nope")]),
        "corrupt": (base(files, tmp_path / "b.zarr", **{"--data": files["corrupt"]}), ["class_1/img_001.jpg", "unreadable"]),
        "locked": (base(files, locked), [str(locked), f"pid {os.getpid()}", "another mealkd process"]),
    }
    with StoreLock(str(locked)):
        procs = {
            name: subprocess.Popen([sys.executable, str(REPO / "cli.py"), *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, (argv, _) in runs.items()
        }
        results = {name: (p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    for name, (code, out, err) in results.items():
        assert_one_line_error(code, err, *runs[name][1])
        assert out == "", (name, out)
    assert not storage.store_exists(str(locked))
    assert not storage.store_exists(str(tmp_path / "b.zarr"))


def test_probe_names_the_corrupt_file_and_measures_the_rest(files):
    """Validation in small batches: the corrupt file fails its whole DALI batch; it alone is reported,
    and every other image (before and after it, in later batches) gets its decoded (H, W)."""
    import torch
    from PIL import Image

    from mealkd.core.dali_io import Backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.probe import probe_images

    index = scan_image_folder(files["corrupt"])
    bad_id = index.paths.index("class_1/img_001.jpg")
    for batch_size in (2, 4, 64):
        sizes, bad = probe_images(index, np.arange(len(index)), Backend(torch.device("cpu")), batch_size=batch_size)
        assert bad == [bad_id]
        for i, path in enumerate(index.paths):
            expected = [0, 0] if i == bad_id else list(Image.open(index.root / path).size[::-1])
            assert sizes[i].tolist() == expected, (batch_size, path)


def test_probe_retry_reuses_one_pipeline_between_corrupt_files(tmp_path, monkeypatch):
    """A failed batch is retried file by file through one batch-1 pipeline, rebuilt only after a file
    fails (a new pipeline per file took minutes on a GPU); sizes and culprits are as before."""
    import torch
    from PIL import Image

    from mealkd.core import probe
    from mealkd.core.dali_io import Backend
    from mealkd.core.dataset import scan_image_folder

    folder = tmp_path / "data" / "c0"
    folder.mkdir(parents=True)
    corrupt = {"img_01.jpg", "img_05.jpg"}
    for k in range(9):
        name = f"img_{k:02d}.jpg"
        if name in corrupt:
            (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
        else:
            Image.new("RGB", (20 + 3 * k, 30 + k), (10 * k, 80, 160)).save(folder / name)
    built = []
    real = probe._probe_pipeline
    monkeypatch.setattr(probe, "_probe_pipeline", lambda *a, **kw: built.append(a[1]) or real(*a, **kw))
    index = scan_image_folder(tmp_path / "data")
    sizes, bad = probe.probe_images(index, np.arange(len(index)), Backend(torch.device("cpu")), batch_size=16)
    assert [index.paths[i] for i in bad] == ["c0/img_01.jpg", "c0/img_05.jpg"]
    for i, path in enumerate(index.paths):
        expected = [0, 0] if i in bad else list(Image.open(index.root / path).size[::-1])
        assert sizes[i].tolist() == expected, path
    # the batch of 16, then batch-1 pipelines: the first, and one after each corrupt file
    assert built == [16, 1, 1, 1], built


PROBE_REPEATEDLY = """
import sys, numpy as np, torch
from mealkd.core.dali_io import Backend
from mealkd.core.dataset import scan_image_folder
from mealkd.core.probe import probe_images
index = scan_image_folder(sys.argv[1])
for _ in range(int(sys.argv[2])):
    sizes, bad = probe_images(index, np.arange(len(index)), Backend(torch.device("cpu")), batch_size=64, num_threads=2)
    assert [index.paths[i] for i in bad] == ["c0/aa_corrupt.jpg"], bad
print("ok")
"""


def test_validating_a_corrupt_file_never_crashes_the_process(tmp_path):
    """A corrupt file decoded first in its batch, beside larger good ones: with DALI's asynchronous
    executor this killed the process (SIGSEGV in share_outputs) within a few batches (2026-11-26);
    validation pipelines run synchronously. A subprocess, so a crash fails this test, not the suite."""
    data = make_jpeg_tree(tmp_path / "data", classes=2, per_class=24, seed=8, min_side=300, max_side=700)
    (data / "class_0").rename(data / "c0")
    (data / "c0" / "aa_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg, truncated " * 8)
    proc = subprocess.run([sys.executable, "-c", PROBE_REPEATEDLY, str(data), "12"], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-1500:])


@pytest.mark.parametrize("teachers,backend,culprits", [
    ("script", "aot_eager", ["--compile", "TorchScript"]),
    ("mobile", "no_such_backend", ["--compile-backend no_such_backend", "inductor"]),
])
def test_compile_errors(teachers, backend, culprits, files, tmp_path, capsys):
    """--compile of a TorchScript teacher, or an unknown --compile-backend: one line before any work."""
    out = tmp_path / "store.zarr"
    spec = str(files["t3"]["script"]) if teachers == "script" else f"torchvision:mobilenet_v3_small@{files['t3']['mobile']}"
    code, err = run_in_process(base(files, out, **{"--teachers": spec, "--compile-backend": backend}) + ["--compile"], capsys)
    assert_one_line_error(code, err, *culprits)
    assert not storage.store_exists(str(out))


def test_skip_bad_refuses_a_store_with_nothing_to_train_on(files, tmp_path, capsys):
    """--skip-bad with every file unreadable, or every file of one class: one line, no store (it used to
    be a 'complete' store of zero usable images, exit 0, that verify passed)."""
    for name, junk in (("all", "class_*"), ("one class", "class_1")):
        data = make_jpeg_tree(tmp_path / name, classes=3, per_class=2, seed=4, min_side=24, max_side=32)
        for path in data.glob(f"{junk}/*.jpg"):
            path.write_bytes(b"not an image")
        out = tmp_path / f"{name}.zarr"
        argv = base(files, out, **{"--data": data, "--teachers": files["t3"]["script"]}) + ["--skip-bad"]
        code, err = run_in_process(argv, capsys)
        needles = ["none of its 6 image file(s)", "nothing to train on"] if name == "all" else ["class 'class_1'", "nothing to train on"]
        assert_one_line_error(code, err, str(data), *needles)
        assert not storage.store_exists(str(out))


def test_bad_out_is_refused_before_the_dataset_is_validated(files, tmp_path, capsys):
    """--out a file, a non-empty directory that is not a store, or below a file: one line naming --out,
    before the validation decode (the tree here has a corrupt file, which validation would report first;
    the run used to find the file only when writing, as 'writing the label store failed (File exists)');
    the dry run says the same, and merge / import-fkd check their --out first too."""
    a_file = tmp_path / "a_file.zarr"
    a_file.write_text("x")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("someone's files")
    cases = {a_file: "a file is there", occupied: "not a label store is already there", a_file / "s.zarr": f"{a_file} is a file"}
    for out, what in cases.items():
        for extra in ([], ["--dry-run"]):
            code, err = run_in_process(base(files, out, **{"--data": files["corrupt"]}) + extra, capsys)
            assert_one_line_error(code, err, f"--out {out}", what)
    assert a_file.read_text() == "x" and [p.name for p in occupied.iterdir()] == ["keep.txt"]
    missing = tmp_path / "no_such"
    code, err = run_in_process(["merge", str(missing / "a.zarr"), str(missing / "b.zarr"), "--out", str(occupied)], capsys)
    assert_one_line_error(code, err, f"--out {occupied}", "not a label store")
    code, err = run_in_process(["import-fkd", str(missing), "--data", str(missing), "--out", str(a_file)], capsys)
    assert_one_line_error(code, err, f"--out {a_file}", "a file is there")


def test_inspect_negative_sample_is_one_line(files, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    code, err = run_in_process(base(files, out), capsys)
    assert code == 0, err
    code, err = run_in_process(["inspect", str(out), "--sample", "-5"], capsys)  # was numpy's ValueError traceback
    assert_one_line_error(code, err, "--sample -5", ">= 0")
