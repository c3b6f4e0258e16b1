"""Rough edges of issue 9 (items 6, 8-11, 13, 14), each with the real components.

One module fixture builds the world once: a 3-class x 3-image JPEG tree, two TorchScript teachers,
a label store precomputed with ``--out ~/labels.zarr`` (HOME pointed at a temp dir, so the lock
path is checked too), a TorchScript student distilled from it for one epoch by the real CLI, and
a validation tree. Subprocesses of ``cli.py`` are used where the real stderr (file descriptor 2,
where the decoder writes) is what is tested.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mealkd.core.checkpoint_io import TRUST_ENV, load_torch_file
from mealkd.core.dali_io import build_pipeline, resolve_backend, run_batches, to_torch
from mealkd.core.dataset import scan_image_folder
from mealkd.core.models import load_model
from mealkd.core.probe import decoder_log
from mealkd.core.replay import FILES, IMAGENET_MEAN, IMAGENET_STD, Normalization, eval_graph
from mealkd.distill.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from mealkd.distill.checkpoint_eval import evaluate_checkpoint
from mealkd.precompute.ensemble import TeacherEnsemble
from mealkd.precompute.lock import StoreLock
from mealkd.precompute.runner import PrecomputeConfig, run_precompute
from mealkd.errors import UserError
from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import ENV, REPO, assert_user_error, cli, run, tiny_world

SIZE = 16
CPU = resolve_backend("cpu")
BROKEN = b"\xff\xd8\xff\xe0 not really a jpeg" * 3  # the decoder logs "[ERROR] [jpeg_parser] Invalid marker"


class TinyStudent(torch.nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Payload:
    """An arbitrary object: what a weights_only load must refuse."""

    def __init__(self, value: int = 7):
        self.value = value


def script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


def main_ok(*argv: str) -> None:
    from mealkd import cli as mealkd_cli

    with pytest.raises(SystemExit) as exit_:
        mealkd_cli.main(list(argv))
    assert exit_.value.code == 0, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rough")
    data, teachers = tiny_world(root, seed=3)
    home, work = root / "home", root / "work"
    home.mkdir()
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.chdir(work)
        run_precompute(PrecomputeConfig(data=str(data), teachers=teachers, out="~/labels.zarr", crops_per_image=2, image_size=SIZE,
                                        batch_size=8, device="cpu", num_threads=1))
    store = home / "labels.zarr"
    torch.manual_seed(4)
    student = script(TinyStudent(), root / "student.pt")
    run_dir = root / "run"
    main_ok("distill", "--labels", str(store), "--data", str(data), "--student", str(student), "--init", "pretrained",
            "--out", str(run_dir), "--epochs", "1", "--batch-size", "4", "--lr", "0.5", "--device", "cpu", "--num-threads", "1")
    val = make_jpeg_tree(root / "val", 3, 3, seed=9, min_side=20, max_side=40)
    tv_checkpoint = root / "tv_checkpoint.pt"  # a torchvision student's checkpoint, as distill writes it
    torch.manual_seed(8)
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "epoch": 1, "model": torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(),
                "student_spec": "torchvision:mobilenet_v3_small", "num_classes": 3, "class_names": ["class_0", "class_1", "class_2"],
                "norm": {"size": SIZE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}, tv_checkpoint)
    return {"root": root, "home": home, "work": work, "data": data, "teachers": teachers, "store": store, "student": student,
            "run": run_dir, "checkpoint": run_dir / "checkpoint.pt", "val": val, "tv_checkpoint": tv_checkpoint}


def with_broken_file(src: Path, dst: Path, name: str = "class_1/zz_broken.jpg") -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / name).write_bytes(BROKEN)
    return dst


# ---------------------------------------------------------------------------------------------
# 11: --out ~/labels.zarr locks ~/labels.zarr.lock
# ---------------------------------------------------------------------------------------------
def test_store_lock_expands_the_home_directory(world, tmp_path, monkeypatch):
    assert (world["home"] / "labels.zarr.lock").is_file()  # the fixture's precompute ran with --out ~/labels.zarr
    assert not (world["work"] / "~").exists()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert StoreLock("~/x.zarr").path == tmp_path / "x.zarr.lock"
    assert StoreLock("file:///data/a%20b.zarr").path == Path("/data/a b.zarr.lock")
    assert StoreLock("s3://bucket/x.zarr").path is None


# ---------------------------------------------------------------------------------------------
# 6: the decoder's C-level stderr is folded into mealkd's one line
# ---------------------------------------------------------------------------------------------
def test_decoder_log_keeps_python_output_and_restores_fd2_on_errors(capfd):
    before = os.fstat(2)
    with pytest.raises(ValueError, match="boom"):
        with decoder_log() as lines:
            os.write(2, b"\x1b[0;31m[ERROR] \x1b[0m[jpeg_parser] Invalid marker\n")
            os.write(2, b"a python warning line\n")
            raise ValueError("boom")
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    assert lines == ["[ERROR] [jpeg_parser] Invalid marker"]
    err = capfd.readouterr().err
    assert "a python warning line" in err and "jpeg_parser" not in err


def test_corrupt_jpeg_precompute_prints_one_line(world, tmp_path):
    data = with_broken_file(world["data"], tmp_path / "data")
    proc = cli("precompute", "--data", str(data), "--teachers", world["teachers"], "--out", str(tmp_path / "s.zarr"),
               "--image-size", str(SIZE), "--crops-per-image", "2", "--device", "cpu")
    line = assert_user_error(proc, "--data", "zz_broken.jpg", "jpeg_parser: Invalid marker", "--skip-bad")
    assert "[jpeg_parser]" not in proc.stderr and "[ERROR]" not in proc.stderr, proc.stderr
    assert proc.stderr.count("Invalid marker") == 1, proc.stderr
    assert line.startswith("error: --data: 1 unreadable image file(s)")
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------------------------------------
# 8: evaluate with unreadable validation files
# ---------------------------------------------------------------------------------------------
def test_evaluate_counts_and_reports_unreadable_files(world, tmp_path, capsys):
    val = with_broken_file(world["val"], tmp_path / "val")
    proc = cli("evaluate", "--data", str(val), "--checkpoint", str(world["tv_checkpoint"]), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["images"] == 9 and got["unreadable"] == 1
    warning = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and "skipping 1 unreadable" in warning[0], proc.stderr
    assert "zz_broken.jpg" in warning[0] and "jpeg_parser: Invalid marker" in warning[0]
    assert "[jpeg_parser]" not in proc.stderr and "[ERROR]" not in proc.stderr
    clean = evaluate_checkpoint(str(world["val"]), str(world["tv_checkpoint"]), device="cpu")
    assert (got["top1"], got["top5"]) == (clean["top1"], clean["top5"]) and clean["unreadable"] == 0

    table = run(capsys, "evaluate", "--data", str(val), "--checkpoint", str(world["tv_checkpoint"]), "--device", "cpu")
    assert table.returncode == 0 and "unreadable" in table.stdout
    row = next(line for line in table.stdout.splitlines() if "%" in line)
    assert [cell.strip() for cell in row.split("\u2502") if cell.strip()][:2] == ["9", "1"], table.stdout


def test_evaluate_without_any_readable_image_is_a_user_error(world, tmp_path, capsys):
    for k in range(3):
        (tmp_path / "val" / f"class_{k}").mkdir(parents=True)
        (tmp_path / "val" / f"class_{k}" / "bad.jpg").write_bytes(BROKEN)
    proc = run(capsys, "evaluate", "--data", str(tmp_path / "val"), "--checkpoint", str(world["tv_checkpoint"]), "--device", "cpu")
    line = assert_user_error(proc, "--data", "none of its 3 image file(s) can be decoded", "bad.jpg")
    assert "ZeroDivision" not in proc.stderr and line


# ---------------------------------------------------------------------------------------------
# 9: evaluate a TorchScript student's distill checkpoint
# ---------------------------------------------------------------------------------------------
def by_hand_top1(module: torch.nn.Module, val: Path) -> float:
    index = scan_image_folder(val)
    pipe = build_pipeline(eval_graph(Normalization(SIZE), "cpu"), batch_size=1, backend=CPU, num_threads=1)
    hits = 0
    module.eval()
    with torch.no_grad():
        for i in range(len(index)):
            feed = {FILES: index.file_feed([i]), "target": [np.array(0, dtype=np.int64)]}
            (x,) = list(run_batches(pipe, [feed], lambda outs: to_torch(outs[0], CPU.device)))
            hits += int(module(x).argmax(1).item() == index.targets[i])
    return hits / len(index)


def test_evaluate_torchscript_student_checkpoint(world, capsys):
    ckpt = load_checkpoint(world["checkpoint"])
    assert ckpt["student_spec"] == str(world["student"])
    trained = torch.jit.load(str(world["student"]))
    original = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.load_state_dict(ckpt["model"])
    assert any(not torch.equal(original[k], v) for k, v in ckpt["model"].items())  # training moved the weights
    want = by_hand_top1(trained, world["val"])

    got = evaluate_checkpoint(str(world["val"]), str(world["checkpoint"]), device="cpu")
    assert got["images"] == 9 and got["top1"] == want
    proc = run(capsys, "evaluate", "--data", str(world["val"]), "--checkpoint", str(world["checkpoint"]), "--device", "cpu", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["top1"] == want

    loaded = load_model(str(world["student"]), num_classes=3, init=str(world["checkpoint"]))  # also what --init RUN/checkpoint.pt does
    assert loaded.class_names == ckpt["class_names"] and loaded.weights_path == str(world["checkpoint"])
    for k, v in ckpt["model"].items():
        assert torch.equal(loaded.module.state_dict()[k], v), k


def test_torchscript_checkpoint_whose_student_file_moved(world, tmp_path, capsys):
    ckpt = load_checkpoint(world["checkpoint"])
    moved = tmp_path / "checkpoint.pt"
    torch.save(dict(ckpt, student_spec=str(tmp_path / "gone.pt")), moved)
    proc = run(capsys, "evaluate", "--data", str(world["val"]), "--checkpoint", str(moved), "--device", "cpu")
    assert_user_error(proc, "--checkpoint", "gone.pt", "--student")
    proc = run(capsys, "evaluate", "--data", str(world["val"]), "--checkpoint", str(moved), "--student", str(world["student"]), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# 10: one torch.load policy
# ---------------------------------------------------------------------------------------------
def test_one_torch_load_in_the_project():
    """Every torch.load outside the tests is core.checkpoint_io's."""
    offenders = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("tests", "build", "demo_out") and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(REPO).as_posix()
            if name.endswith(".py") and rel != "core/checkpoint_io.py" and re.search(r"torch\.load\(", path.read_text(errors="replace")):
                offenders.append(rel)
    assert offenders == []


def test_arbitrary_pickle_refused_unless_trusted(world, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    ckpt = load_checkpoint(world["checkpoint"])
    evil = tmp_path / "evil.pt"
    torch.save(dict(ckpt, extra=Payload(7)), evil)
    with pytest.raises(UserError) as e:
        load_checkpoint(evil)
    msg = str(e.value)
    assert "\n" not in msg and TRUST_ENV + "=1" in msg and "Payload" in msg and str(evil) in msg
    proc = run(capsys, "evaluate", "--data", str(world["val"]), "--checkpoint", str(evil), "--device", "cpu")
    assert_user_error(proc, "--checkpoint", TRUST_ENV)
    with pytest.raises(UserError, match=TRUST_ENV):
        load_model("torchvision:resnet18", init=str(evil))

    # a real distill checkpoint holds nothing the safe policy refuses
    raw = torch.load(world["checkpoint"], map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["model"] and raw["optimizer"]
    truncated = world["root"] / "truncated.pt"
    truncated.write_bytes(world["checkpoint"].read_bytes()[:200])
    with pytest.raises(UserError, match="is the file complete") as e:
        load_checkpoint(truncated)
    assert "\n" not in str(e.value)

    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_torch_file(evil, "--checkpoint")["extra"].value == 7
    assert load_checkpoint(evil)["epoch"] == ckpt["epoch"]


# ---------------------------------------------------------------------------------------------
# 13: teacher class names must be in the dataset's order
# ---------------------------------------------------------------------------------------------
def test_teacher_with_permuted_class_names_is_refused(world, tmp_path, capsys):
    torch.manual_seed(5)
    net = torchvision.models.mobilenet_v3_small(num_classes=3)
    permuted, ordered = tmp_path / "permuted.pth", tmp_path / "ordered.pth"
    torch.save({"model": net.state_dict(), "class_names": ["class_0", "class_2", "class_1"]}, permuted)
    torch.save({"model": net.state_dict(), "class_names": ["class_0", "class_1", "class_2"]}, ordered)
    spec = f"torchvision:mobilenet_v3_small@{permuted}"

    proc = run(capsys, "precompute", "--data", str(world["data"]), "--teachers", f"{world['student']},{spec}",
               "--out", str(tmp_path / "s.zarr"), "--image-size", str(SIZE), "--device", "cpu")
    line = assert_user_error(proc, "--teachers", spec, "output 1", "'class_2'", "'class_1'", "reorder", "retrain")
    assert "permuted.pth" in line and not (tmp_path / "s.zarr").exists()

    proc = run(capsys, "verify", str(world["store"]), "--data", str(world["data"]), "--teachers", spec, "--device", "cpu")
    assert_user_error(proc, "--teachers", "output 1")

    good = load_model(f"torchvision:mobilenet_v3_small@{ordered}", num_classes=3)
    assert good.class_names == ["class_0", "class_1", "class_2"]
    TeacherEnsemble([good], default_size=SIZE, temperature=1.0, device=CPU.device, class_names=scan_image_folder(world["data"]).class_names)


# ---------------------------------------------------------------------------------------------
# 14: one input-size rule for hub-cache and file teachers; inspect shows it
# ---------------------------------------------------------------------------------------------
def test_hub_and_file_teachers_get_the_same_input_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from mealkd.core.models import hub_weights_path

    torch.manual_seed(6)
    net = torchvision.models.efficientnet_b0()
    _, hub_file = hub_weights_path("efficientnet_b0")
    Path(hub_file).parent.mkdir(parents=True)
    torch.save(net.state_dict(), hub_file)
    assert torchvision.models.EfficientNet_B0_Weights.DEFAULT.transforms().crop_size[0] == 224
    hub = load_model("torchvision:efficientnet_b0")
    from_file = load_model(f"torchvision:efficientnet_b0@{hub_file}")
    sized = load_model("torchvision:efficientnet_b0:size=40")
    assert hub.input_size is None and from_file.input_size is None and sized.input_size == 40
    ensemble = TeacherEnsemble([hub, from_file, sized], default_size=SIZE, temperature=1.0, device=CPU.device)
    assert [ensemble.norms[i].size for i in ensemble.norm_of] == [SIZE, SIZE, 40]


def test_inspect_shows_each_teachers_input_size_and_normalisation(world, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one teacher per line, unwrapped
    proc = run(capsys, "inspect", str(world["store"]))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "t1.pt" in line or "t2.pt" in line]
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert f"input {SIZE} (the crop size)" in line and "mean 0.485/0.456/0.406 std 0.229/0.224/0.225" in line, line


@pytest.mark.parametrize("ending", ["error", "stop"])
def test_a_one_line_error_is_not_buried_by_pending_reads_at_exit(tmp_path, ending):
    """A remote store's reads still pending in an event loop when a command stops with a one-line error (the
    endpoint went away) were torn down at exit with 'Task was destroyed but it is pending!' and 'Exception
    ignored in' tracebacks, hundreds of lines under the error; a stop by SIGTERM the same (a merge printed 38
    such lines after its stop line). Here: three such reads, then a real refusal, or a real SIGTERM."""
    script = tmp_path / "pending.py"
    command = (f"cli.main(['inspect', {str(tmp_path / 'gone.zarr')!r}])\n" if ending == "error" else
               "import os, signal, time, click\n"
               "from mealkd.core.signals import stopping_on_signals\n"
               "@click.command('stopper')\n"
               "def stopper():\n"
               "    with stopping_on_signals('merge'):\n"
               "        os.kill(os.getpid(), signal.SIGTERM)\n"
               "        time.sleep(30)\n"
               "cli.cli.add_command(stopper)\n"
               "cli.main(['stopper'])\n")
    script.write_text(
        "import asyncio\n"
        "from mealkd import cli\n"
        "loop = asyncio.new_event_loop()\n"
        "async def read():\n"
        "    try:\n"
        "        await asyncio.sleep(3600)\n"
        "    finally:\n"
        "        raise OSError('connection reset')\n"
        "tasks = [loop.create_task(read()) for _ in range(3)]\n"
        "loop.run_until_complete(asyncio.sleep(0))\n" + command
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    if ending == "error":
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'gone.zarr'}: not a mealkd label store (nothing there); "
                                                    "pass the output path of `mealkd precompute`"]
    else:
        assert proc.returncode == 143
        assert proc.stderr.strip().splitlines() == ["merge: stopped by SIGTERM; shards already finished are kept: rerun the same "
                                                    "command to continue"]
