"""`mealkd export` and the ``FILE.pt2`` (torch.export ExportedProgram) model spec.

Everything is real: a JPEG tree, a label store from a real precompute, a student trained by a real
`mealkd distill` run (torchvision mobilenet_v3_small, 16 px), the real `export` command, and each file
loaded back with its standard tool only (torch.load + torchvision's model, safetensors, torch.export.load,
onnx.checker / onnxruntime), compared with the checkpoint's model rebuilt here by hand. Then a ``.pt2``
teacher in a real precompute and a ``.pt2`` student in a real distill run. Torch runs single-threaded
(two shared cores).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.test_reliability_common import ENV, REPO, TinyTeacher, assert_user_error, precompute_args, run, store_arrays, tiny_teacher

SIZE, CLASSES = 16, 3


def cli_in_process(*argv: str) -> None:
    from mealkd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 0, argv


def distill_args(store: Path, data: Path, out: Path, student: str, init: str) -> list[str]:
    return ["distill", "--labels", str(store), "--data", str(data), "--student", student, "--init", init, "--out", str(out),
            "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--num-threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store and a 1-epoch mobilenet_v3_small student; ``reference``: the checkpoint's model built by hand."""
    from tests.datagen import make_jpeg_tree

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    data = make_jpeg_tree(root / "data", classes=CLASSES, per_class=4, seed=3, min_side=24, max_side=36)
    store = root / "labels.zarr"
    cli_in_process(*precompute_args(data, str(tiny_teacher(root / "t.pt")), store, "--num-threads", "1"))
    run_dir = root / "run"
    cli_in_process(*distill_args(store, data, run_dir, "torchvision:mobilenet_v3_small", "scratch"))
    checkpoint = run_dir / "checkpoint.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    reference = torchvision.models.mobilenet_v3_small(num_classes=CLASSES)
    reference.load_state_dict(ckpt["model"])
    reference.eval()
    batch = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(batch)
    return {"root": root, "data": data, "store": store, "checkpoint": checkpoint, "ckpt": ckpt, "batch": batch, "want": want}


def export(trained, fmt: str, name: str) -> tuple[Path, dict]:
    out = trained["root"] / "exports" / name
    cli_in_process("export", str(trained["checkpoint"]), "--format", fmt, "--out", str(out))
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    ckpt = trained["ckpt"]
    assert sidecar["class_names"] == ckpt["class_names"] and sidecar["num_classes"] == CLASSES
    assert sidecar["input_size"] == SIZE and sidecar["mean"] == pytest.approx(ckpt["norm"]["mean"])
    assert sidecar["std"] == pytest.approx(ckpt["norm"]["std"]) and sidecar["student_spec"] == "torchvision:mobilenet_v3_small"
    # evaluate's default transform, for a downstream user's own: resize the shorter side to round(S / 0.875), centre crop S
    assert sidecar["eval_transform"] == {"resize_shorter": round(SIZE / 0.875), "interpolation": "bilinear", "antialias": True,
                                         "center_crop": SIZE}
    assert "transform_input" not in sidecar  # only googlenet / inception_v3 re-normalise inside
    return out, sidecar


def test_export_records_that_googlenet_renormalises_its_input(tmp_path):
    """torchvision builds googlenet / inception_v3 with transform_input=True when they come with weights, and
    mealkd always does: a downstream googlenet(num_classes=...) defaults to False and would see other inputs."""
    weights = tmp_path / "googlenet.pth"
    torch.save(torchvision.models.googlenet(num_classes=CLASSES, aux_logits=False, init_weights=False).state_dict(), weights)
    out = tmp_path / "googlenet_export.pth"
    cli_in_process("export", str(weights), "--student", "torchvision:googlenet", "--image-size", "64", "--format", "state-dict",
                   "--out", str(out))
    assert json.loads(Path(str(out) + ".json").read_text())["transform_input"] is True


def test_state_dict_and_safetensors_load_into_torchvision_exactly(trained):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is in the test extra: pip install -e '.[test]'")
    out, sidecar = export(trained, "state-dict", "student.pth")
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=CLASSES)
    model.load_state_dict(state)  # strict
    with torch.no_grad():
        assert torch.equal(model.eval()(trained["batch"]), trained["want"])
    assert sidecar["check"]["max_abs_diff"] == 0.0

    out, sidecar = export(trained, "safetensors", "student.safetensors")
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=CLASSES)
    model.load_state_dict(safetensors_torch.load_file(str(out)))
    with torch.no_grad():
        assert torch.equal(model.eval()(trained["batch"]), trained["want"])
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()["class_names"]) == trained["ckpt"]["class_names"]


def test_checkpoints_and_exports_are_shared_as_the_umask_allows(trained):
    """mkstemp and safetensors create owner-only (0600) files: a run's checkpoint and its exports were
    unreadable by teammates and separate evaluation jobs on a shared cluster. Now they get 0666 less the
    umask, like the run's other files (config.json, metrics.jsonl)."""
    import stat

    pytest.importorskip("safetensors.torch", reason="safetensors is in the test extra: pip install -e '.[test]'")
    mask = os.umask(0o022)
    os.umask(mask)
    shared = 0o666 & ~mask
    run_dir = trained["checkpoint"].parent
    files = [trained["checkpoint"], run_dir / "config.json"]
    files += [export(trained, fmt, name)[0] for fmt, name in (("safetensors", "shared.safetensors"), ("state-dict", "shared.pth"))]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): oct(shared) for f in files}


def test_pt2_loads_with_torch_export_and_is_a_model_spec(trained):
    out, sidecar = export(trained, "pt2", "student.pt2")
    module = torch.export.load(str(out)).module()
    with torch.no_grad():
        for n in (1, 5):  # the batch axis is dynamic
            assert float((module(trained["batch"][:n]) - trained["want"][:n]).abs().max()) <= 1e-5
    assert sidecar["check"]["max_abs_diff"] <= 1e-5

    from mealkd.core.models import describe, load_model

    loaded = load_model(str(out))  # the .pt2 spec: class count from a probe, size from the recorded example input
    assert (loaded.spec.source, loaded.num_classes, loaded.input_size) == ("export", CLASSES, SIZE)
    assert describe(loaded)["weights_sha256"] is not None
    with torch.no_grad():
        assert float((loaded.module(trained["batch"]) - trained["want"]).abs().max()) <= 1e-5


def test_onnx_export(trained, capsys):
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # the optional extra is absent: the export must say which one, in one line, exit 2
        proc = run(capsys, "export", str(trained["checkpoint"]), "--format", "onnx", "--out", str(trained["root"] / "x.onnx"))
        assert_user_error(proc, "--format onnx", "mealkd[onnx]", missing[0])
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'mealkd[onnx]'): checked the error only")
    import onnx

    out, sidecar = export(trained, "onnx", "student.onnx")
    onnx.checker.check_model(str(out))
    assert sidecar["onnx"]["exporter"] == "dynamo"
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed: the ONNX file was written and passes onnx.checker; outputs not compared")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        got = session.run(None, {"input": trained["batch"][:n].numpy()})[0]
        assert float(np.abs(got - trained["want"][:n].numpy()).max()) <= 1e-5
    assert sidecar["check"]["max_abs_diff"] <= 1e-5 and "onnxruntime" in sidecar["check"]["checked_with"]


def test_bad_input_is_one_line_exit_2(trained, capsys, tmp_path):
    ckpt = str(trained["checkpoint"])
    assert_user_error(run(capsys, "export", ckpt, "--format", "tflite", "--out", str(tmp_path / "m")), "--format tflite", "state-dict")
    assert_user_error(run(capsys, "export", str(tmp_path / "nope.pt"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")),
                      "nope.pt", "not found")
    assert_user_error(run(capsys, "export", ckpt, "--format", "pt2", "--out", str(tmp_path)), "--out", "directory")
    run_dir = str(trained["checkpoint"].parent)  # the run where its checkpoint was meant: it said 'file not found'
    assert_user_error(run(capsys, "export", run_dir, "--format", "pt2", "--out", str(tmp_path / "m.pt2")),
                      f"{run_dir}: a directory, not a checkpoint or weights file; pass its checkpoint, {trained['checkpoint']}")
    # a missing optional package, in a real interpreter where importing it fails (as when it is not installed)
    code = ("import sys; sys.modules['safetensors'] = None; import cli; "
            f"cli.main(['export', {ckpt!r}, '--format', 'safetensors', '--out', {str(tmp_path / 'm.safetensors')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "--format safetensors", "safetensors", "pip install 'mealkd[export]'")
    assert not (tmp_path / "m.safetensors").exists()


def test_pt2_teacher_in_precompute(trained, tmp_path):
    """A .pt2 teacher exported at 12 px runs at its recorded size in a 16 px precompute, and gives the
    labels of the same weights as a TorchScript teacher given :size=12."""
    torch.manual_seed(11)
    teacher = TinyTeacher(CLASSES).eval()
    program = torch.export.export(teacher, (torch.randn(2, 3, 12, 12),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "teacher.pt2"))
    torch.jit.script(teacher).save(str(tmp_path / "teacher.pt"))
    cli_in_process(*precompute_args(trained["data"], str(tmp_path / "teacher.pt2"), tmp_path / "a.zarr", "--num-threads", "1"))
    cli_in_process(*precompute_args(trained["data"], f"{tmp_path / 'teacher.pt'}:size=12", tmp_path / "b.zarr", "--num-threads", "1"))
    a, b = store_arrays(tmp_path / "a.zarr"), store_arrays(tmp_path / "b.zarr")
    assert np.array_equal(a["windows"], b["windows"]) and a["done"].all()
    assert np.allclose(a["probs"].astype(np.float32), b["probs"].astype(np.float32), atol=2e-3)
    import zarr

    (record,) = zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs["teachers"]
    assert record["source"] == "export" and record["input_size"] == 12


def test_exported_files_evaluate_like_their_checkpoint(trained, capsys):
    """`evaluate --checkpoint` of an exported .pt2 (a whole model) and of an exported state dict, with no
    --student or --image-size: the sidecar says what they are. Before, the .pt2 failed ("data.pkl: file not
    found") and the state dict needed both flags. The same images get the same top-1 as the checkpoint."""
    want = run(capsys, "evaluate", "--data", str(trained["data"]), "--checkpoint", str(trained["checkpoint"]), "--device", "cpu", "--json")
    assert want.returncode == 0, want.stderr
    want = json.loads(want.stdout)
    formats = [("pt2", "eval.pt2"), ("state-dict", "eval.pth")]
    if importlib.util.find_spec("safetensors"):
        formats.append(("safetensors", "eval.safetensors"))  # "not a PyTorch file" before
    for fmt, name in formats:
        out, _ = export(trained, fmt, name)
        got = run(capsys, "evaluate", "--data", str(trained["data"]), "--checkpoint", str(out), "--device", "cpu", "--json")
        assert got.returncode == 0, (fmt, got.stderr)
        got = json.loads(got.stdout)
        assert (got["top1"], got["top5"], got["images"]) == (want["top1"], want["top5"], want["images"]), (fmt, got, want)
        assert got["protocol"] == want["protocol"], fmt
    pt2 = trained["root"] / "exports" / "eval.pt2"  # exported at its fixed training size: another size is one line
    code = run(capsys, "evaluate", "--data", str(trained["data"]), "--checkpoint", str(pt2), "--device", "cpu", "--image-size", "20")
    assert_user_error(code, "--image-size 20", "images only")


def test_pt2_student_distils_and_evaluates(trained, tmp_path, capsys):
    """A .pt2 student (used as-is, like TorchScript): trains from its own weights, its checkpoint evaluates
    and loads back into the program; init scratch is refused in one line."""
    pt2 = tmp_path / "student.pt2"
    cli_in_process("export", str(trained["checkpoint"]), "--format", "pt2", "--out", str(pt2))
    proc = run(capsys, *distill_args(trained["store"], trained["data"], tmp_path / "bad", str(pt2), "scratch"))
    assert_user_error(proc, "cannot be re-initialised", "pretrained")
    cli_in_process(*distill_args(trained["store"], trained["data"], tmp_path / "run", str(pt2), "pretrained"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["student_spec"] == str(pt2)
    start = torch.export.load(str(pt2)).module().state_dict()
    assert any(not torch.equal(start[k], v) for k, v in ckpt["model"].items()), "training changed no weight"
    module = torch.export.load(str(pt2)).module()
    module.load_state_dict(ckpt["model"])
    from mealkd.distill.checkpoint_eval import evaluate_checkpoint

    result = evaluate_checkpoint(str(trained["data"]), str(tmp_path / "run" / "checkpoint.pt"), device="cpu")
    assert result["images"] == CLASSES * 4 and 0 <= result["top1"] <= result["top5"] <= 1


def test_a_checkpoint_with_broken_weights_is_named_by_evaluate_and_export(trained, capsys, tmp_path):
    """NaN weights (a run that diverged, before distill stopped such runs): evaluate printed a chance-level top-1
    (every argmax one class) and export failed 'differs from the checkpoint's model by nan', exit 1."""
    ckpt = dict(trained["ckpt"])
    ckpt["model"] = {k: (torch.full_like(v, float("nan")) if k == "classifier.3.weight" else v) for k, v in ckpt["model"].items()}
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    got = run(capsys, "evaluate", "--data", str(trained["data"]), "--checkpoint", str(broken), "--device", "cpu")
    assert_user_error(got, f"--checkpoint {broken}: the model's outputs are not finite (NaN or inf) on 12 of 12 images", "diverged")
    got = run(capsys, "export", str(broken), "--format", "state-dict", "--out", str(tmp_path / "m.pth"))
    assert_user_error(got, f"CHECKPOINT {broken}: the model's outputs are not finite", "export another checkpoint")
    assert not (tmp_path / "m.pth").exists()
