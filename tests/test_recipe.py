"""The MEAL V2 recipe's exact semantics in stage two (issue 9): temperature, the hard-label term,
what ``--resume`` means, the K-crops bound and a re-initialised head.

Everything is real: JPEG trees on disk, label stores written by a real precompute (a TorchScript
"colour" teacher whose logits follow the class tint), DALI on CPU, real torch training steps and
the real CLI entry point. Torch runs single-threaded (two shared cores).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from mealkd.core.dali_io import build_pipeline, resolve_backend, run_batches, to_torch
from mealkd.core.dataset import scan_image_folder
from mealkd.core.replay import FILES, Normalization, eval_graph
from mealkd.distill.trainer import DistillConfig, Trainer
from mealkd.precompute.runner import PrecomputeConfig, run_precompute
from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import cli

CLASSES, PER_CLASS, R, SIZE = 3, 8, 4, 16
CPU = resolve_backend("cpu")


class ColourNet(torch.nn.Module):
    """Teacher: confident logits = 12 x per-channel mean (the tree tints class k's channel k % 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 12.0 * x.mean(dim=(2, 3))


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A 3-class tree, a validation tree, a teacher, a TorchScript student and two stores of the SAME
    images and crops made at temperature 1 and 4 (different stores: different store ids)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recipe")
    tree = make_jpeg_tree(root / "train", CLASSES, PER_CLASS, seed=0)
    val = make_jpeg_tree(root / "val", CLASSES, 4, seed=1)
    torch.jit.script(ColourNet()).save(str(root / "colour.pt"))
    torch.manual_seed(1)
    torch.jit.script(TinyNet()).save(str(root / "tiny.pt"))
    stores = {}
    for t in (1, 4):
        stores[t] = root / f"t{t}.zarr"
        run_precompute(PrecomputeConfig(
            data=str(tree), teachers=f"{root / 'colour.pt'}:size={SIZE}", out=str(stores[t]), crops_per_image=R,
            image_size=SIZE, batch_size=16, device="cpu", temperature=float(t), images_per_shard=8, num_threads=1,
        ))
    torch.manual_seed(2)
    init = root / "mnv3_init.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=CLASSES).state_dict(), init)
    five = root / "mnv3_five.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=5).state_dict(), five)
    return {"root": root, "tree": tree, "val": val, "stores": stores, "tiny": root / "tiny.pt", "init": init, "five": five}


def config(recipe, out: Path, **overrides) -> DistillConfig:
    base = dict(labels=str(recipe["stores"][1]), data=str(recipe["tree"]), student=str(recipe["tiny"]), init="pretrained",
                out=str(out), epochs=2, batch_size=8, device="cpu", num_threads=1)
    base.update(overrides)
    return DistillConfig(**base)


def val_logits(model: torch.nn.Module, val: Path) -> torch.Tensor:
    index = scan_image_folder(val)
    pipe = build_pipeline(eval_graph(Normalization(SIZE), CPU.decoder), batch_size=16, backend=CPU, num_threads=1)
    feeds = [{FILES: index.file_feed(range(s, min(s + 16, len(index)))),
              "target": [np.array(t, dtype=np.int64) for t in index.targets[s : s + 16]]} for s in range(0, len(index), 16)]
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in run_batches(pipe, feeds, lambda o: (to_torch(o[0], CPU.device), to_torch(o[1], CPU.device)))])


# ---------------------------------------------------------------------------------------------
# 1: temperature
# ---------------------------------------------------------------------------------------------
def test_student_from_a_t4_store_is_as_confident_as_from_a_t1_store(recipe, tmp_path):
    """Stage two fits the student at the store's T (Hinton et al.): a student distilled from a T=4 store
    learns the teacher's logits, not z/4. Before the fix (fit at T=1 to softmax(z/4)) its logit spread
    was ~0.4x the T=1 student's and its confidence far lower; now it is about the same."""
    spread, confidence = {}, {}
    for t in (1, 4):
        trainer = Trainer(config(recipe, tmp_path / f"t{t}", labels=str(recipe["stores"][t]), epochs=80, lr=0.05, discriminator="off"))
        try:
            records = trainer.run()
        finally:
            trainer.close()
        assert records[-1]["temperature"] == t
        logits = val_logits(trainer.model, recipe["val"])
        spread[t] = float(logits.std(dim=1).mean())
        confidence[t] = float(logits.softmax(dim=1).max(dim=1).values.mean())
    assert 0.75 < spread[4] / spread[1] < 1.6, spread
    assert confidence[4] > 0.85 and confidence[1] > 0.85, confidence


def test_loss_at_temperature_and_hard_label_term_match_a_by_hand_computation(recipe, tmp_path):
    """--hard-label-weight: the loader carries each crop's dataset class through DALI, and the step's loss
    is T² CE(z/T, p) + w CE(z, y), here computed by hand from the store and the dataset index."""
    w = 0.5
    trainer = Trainer(config(recipe, tmp_path / "hard", labels=str(recipe["stores"][4]), hard_label_weight=w, crops_per_step=2, batch_size=5))
    try:
        index, store = trainer.index, trainer.store
        ids = trainer.loader.images(0)
        seen = 0
        for batch in trainer.loader.epoch(0):
            b = batch.images.shape[0] // 2
            want_classes = np.repeat(index.targets[ids[seen : seen + b]], 2)
            np.testing.assert_array_equal(batch.classes.numpy(), want_classes)
            slots = trainer.loader.slots(0)
            rows = store.labels(np.repeat(ids[seen : seen + b], 2), np.tile(slots, b))
            np.testing.assert_array_equal(batch.labels.numpy(), rows)
            seen += b
            with torch.no_grad():
                logits = trainer.model(batch.images)
                parts, _ = trainer.losses(logits, batch)
                p = torch.from_numpy(rows).double()
                z = logits.double()
                soft = 16.0 * -(p * torch.log_softmax(z / 4.0, dim=1)).sum(dim=1).mean()
                y = torch.from_numpy(want_classes)
                hard = -torch.log_softmax(z, dim=1)[torch.arange(len(y)), y].mean()
            assert float(parts.soft) == pytest.approx(float(soft), rel=1e-5)
            assert float(parts.hard) == pytest.approx(float(hard), rel=1e-5)
            assert float(parts.total) == pytest.approx(float(soft + w * hard), rel=1e-5)
        assert seen == len(ids)
        records = trainer.run()
    finally:
        trainer.close()
    assert len(records) == 2 and all(r["hard_loss"] > 0 for r in records)


# ---------------------------------------------------------------------------------------------
# 3: resume means one thing; 7: K bound; 12: re-initialised head (through the real entry point)
# ---------------------------------------------------------------------------------------------
def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from mealkd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def cli_args(recipe, out: Path, *extra: str, store: int = 1, init: str | None = None, epochs: int | None = 2) -> list[str]:
    args = ["distill", "--labels", str(recipe["stores"][store]), "--data", str(recipe["tree"]), "--student", "torchvision:mobilenet_v3_small",
            "--out", str(out), "--batch-size", "8", "--device", "cpu", "--num-threads", "1", *extra]
    if init is not None:
        args += ["--init", init]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    return args


@pytest.fixture(scope="module")
def one_epoch_run(recipe, tmp_path_factory):
    """A 3-epoch cosine run killed (SIGKILL) after its epoch-1 checkpoint, with --init a file."""
    out = tmp_path_factory.mktemp("runs") / "r"
    init = recipe["root"] / "deletable_init.pth"
    shutil.copy(recipe["init"], init)
    done = cli(*cli_args(recipe, out, "--lr", "0.02", init=str(init), epochs=3), kill_at="distill-checkpoint:2")
    assert done.returncode == -9, done.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # epoch 2 was logged, its checkpoint never written
    return {"out": out, "init": init}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change, needles", [
    (["--epochs", "5"], ("--epochs 5", "--epochs 3", "--init", "checkpoint.pt")),
    (["--lr", "0.1"], ("--lr 0.1", "--lr 0.02")),
    (["--schedule", "step:2"], ("--schedule step:2", "--schedule cos")),
    (["--discriminator", "off"], ("--discriminator off", "--discriminator meal-v2")),
    (["--init", "scratch"], ("--init scratch",)),
    (["--seed", "3"], ("--seed 3",)),
])
def test_resume_refuses_changed_training_flags(recipe, one_epoch_run, tmp_path, change, needles, capsys):
    out = copy_run(one_epoch_run["out"], tmp_path / "run")
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run_main(cli_args(recipe, out, "--resume", *change, epochs=None), capsys)
    assert_one_line_error(code, err, *needles)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_continues_the_recorded_run_without_its_flags_or_init_file(recipe, one_epoch_run, tmp_path, capsys):
    """--resume with only the paths: the recorded 3-epoch cosine run goes on to epoch 3 at the recorded
    lr schedule, although its --init file was deleted since; --val may be added on resume."""
    out = copy_run(one_epoch_run["out"], tmp_path / "run")
    one_epoch_run["init"].unlink(missing_ok=True)
    code, _, err = run_main(cli_args(recipe, out, "--resume", "--val", str(recipe["val"]), epochs=None), capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    steps = CLASSES * PER_CLASS // 8  # per epoch (batch 8)
    # per-step cosine: the lr each epoch's last step trained with (not the one after it: the last epoch's would be 0)
    cosine = [0.02 * (1 + np.cos(np.pi * (e * steps - 1) / (3 * steps))) / 2 for e in (1, 2, 3)]
    assert [r["lr"] for r in records] == pytest.approx(cosine)
    assert "val_top1" in records[-1] and "val_top1" not in records[0]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["epochs"] == 3 and config["config"]["init"] == str(one_epoch_run["init"])
    assert config["run_info"]["store_id"] == torch.load(out / "checkpoint.pt", weights_only=False)["store_id"]
    code, _, err = run_main(cli_args(recipe, out, "--resume", epochs=None), capsys)  # a finished run resubmitted: says so
    assert code == 0 and "has trained all its epochs already; nothing to do" in err, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_another_store_over_the_same_images(recipe, one_epoch_run, tmp_path, capsys):
    out = copy_run(one_epoch_run["out"], tmp_path / "run")
    code, _, err = run_main(cli_args(recipe, out, "--resume", store=4, epochs=None), capsys)
    assert_one_line_error(code, err, "--labels", str(recipe["stores"][4]), "not the label store", "--init")


@pytest.mark.parametrize("first, then", [("off", "meal-v2"), ("meal-v2", "off")])
def test_resume_with_the_discriminator_switched_is_one_line(recipe, tmp_path, first, then, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(cli_args(recipe, out, "--discriminator", first, init="scratch", epochs=1), capsys)
    assert code == 0, err
    code, _, err = run_main(cli_args(recipe, out, "--resume", "--discriminator", then, init="scratch", epochs=1), capsys)
    assert_one_line_error(code, err, f"--discriminator {then}", f"--discriminator {first}")


def test_crops_per_image_step_above_the_store_is_one_line(recipe, tmp_path, capsys):
    code, _, err = run_main(cli_args(recipe, tmp_path / "run", "--crops-per-image-step", str(R + 1), init="scratch"), capsys)
    assert_one_line_error(code, err, f"--crops-per-image-step {R + 1}", f"{R} crops per image", f"1 to {R}")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_pretrained_init_with_another_class_count_says_the_head_was_reinitialised(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(recipe, out, init="pretrained", epochs=1)
    args[args.index("--student") + 1] = f"torchvision:mobilenet_v3_small@{recipe['five']}"
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert "re-initialised" in err and "--init pretrained" in err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["head_reinitialized"] is True
    assert json.loads((out / "config.json").read_text())["run_info"]["head_reinitialized"] is True


# ---------------------------------------------------------------------------------------------
# --precision (issue 10): parsed once, applied to the student's forward, recorded
# ---------------------------------------------------------------------------------------------
def test_precision_flag_runs_bf16_autocast_on_cpu_and_is_recorded(recipe, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(config(recipe, tmp_path / precision, epochs=1, precision=precision))
        try:
            batch = next(iter(trainer.loader.epoch(0)))
            from mealkd.core.accel import autocast_for

            with autocast_for(trainer.device, trainer.precision):
                logits = trainer.model(batch.images)
            assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            losses[precision] = trainer.run()[0]["loss"]
        finally:
            trainer.close()
        assert json.loads((tmp_path / precision / "config.json").read_text())["run_info"]["precision"] == precision
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_bad_precision_is_one_line(recipe, tmp_path, capsys):
    code, _, err = run_main(cli_args(recipe, tmp_path / "run", "--precision", "fp64", init="scratch"), capsys)
    assert code == 2 and "--precision" in err and "Traceback" not in err
    from mealkd.core.accel import resolve_precision
    from mealkd.errors import UserError

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(UserError, match="--precision fp8"):
        resolve_precision("fp8", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# decoder backends (issue 10): a store decoded on another backend is refused unless accepted
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_made_store(recipe):
    """A copy of the T=1 store whose attributes say nvJPEG on a GPU decoded it (what precompute records there)."""
    import zarr

    copy = recipe["root"] / "gpu_made.zarr"
    shutil.copytree(recipe["stores"][1], copy)
    group = zarr.open_group(str(copy), mode="r+")
    decoder = dict(group.attrs["decoder"], backend="mixed", hw_decoder_load=0.0, gpu="NVIDIA H100 80GB HBM3")
    group.attrs["decoder"] = decoder
    return copy


def test_store_from_another_decoder_is_refused_unless_accepted(recipe, gpu_made_store, tmp_path, capsys):
    args = cli_args(recipe, tmp_path / "run", init="scratch", epochs=1)
    args[args.index("--labels") + 1] = str(gpu_made_store)
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, str(gpu_made_store), "'mixed'", "'cpu'", "--allow-decoder-mismatch")
    assert not (tmp_path / "run").exists()
    code, _, err = run_main([*args, "--allow-decoder-mismatch"], capsys)
    assert code == 0, err
    assert "may differ slightly" in err and "H100" in err


def test_replay_decodes_with_the_hardware_decoder_load_the_store_records(recipe, tmp_path):
    """Stage two replays a GPU-made store with the hardware-decoder load stage one recorded (a later
    default must not change an old store's pixels); a CPU-made store records none and gets the default."""
    import zarr

    from mealkd import storage
    from mealkd.core.dali_io import resolve_backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.replay import HW_DECODER_LOAD, Normalization, recorded_hw_load
    from mealkd.distill.loader import ReplayLoader

    copy = tmp_path / "hw.zarr"
    shutil.copytree(recipe["stores"][1], copy)
    group = zarr.open_group(str(copy), mode="r+")
    assert "hw_decoder_load" not in group.attrs["decoder"]  # made on the CPU
    assert recorded_hw_load(group.attrs["decoder"]) == HW_DECODER_LOAD
    group.attrs["decoder"] = dict(group.attrs["decoder"], backend="mixed", hw_decoder_load=0.65)
    index = scan_image_folder(recipe["tree"])
    store = storage.open_store(str(copy), fingerprint=index.fingerprint)
    loader = ReplayLoader(store, index, Normalization(16), resolve_backend("cpu"), batch_size=4, num_threads=1)
    try:
        assert loader.hw_load == 0.65
        assert sum(b.images.shape[0] for b in loader.epoch(0)) == len(loader.usable)  # the CPU decoder ignores it
    finally:
        loader.close()


def test_decoder_records_compare_without_retired_fields():
    """A GPU store made while the record still held DALI's nvJPEG version (DALI 2 no longer links it) is
    not reported as decoded differently for that field alone; a real difference still is."""
    from mealkd.core.dali_io import decoder_differences

    now = {"backend": "mixed", "dali_version": "2.4.0", "hw_decoder_load": 0.0, "gpu": "NVIDIA H100 80GB HBM3", "nvimgcodec": 900, "cuda": 13000}
    assert decoder_differences(dict(now, nvjpeg=-1), now) == []
    assert decoder_differences(dict(now, nvjpeg=-1, gpu="NVIDIA A100"), now) == ["gpu"]
    assert decoder_differences(dict(now, backend="cpu"), now)[0] == "backend"


def test_gpu_replay_uses_the_stage_one_chain_for_every_k():
    from mealkd.core.replay import decodes_window_only

    assert decodes_window_only("cpu", 1)
    assert not any(decodes_window_only("cpu", k) for k in (2, 3))
    assert not any(decodes_window_only("mixed", k) for k in (1, 2, 3))


def test_resume_accepts_what_the_run_recorded_written_another_way(recipe, one_epoch_run, tmp_path, capsys):
    """A job script that spells the recorded values out: the --init file as an absolute path (recorded relative,
    or the reverse) and --image-size of a run that left it to the student (recorded as None) were refused."""
    import os

    out = copy_run(one_epoch_run["out"], tmp_path / "run")
    init = json.loads((out / "config.json").read_text())["config"]["init"]
    size = torch.load(out / "checkpoint.pt", weights_only=False)["norm"]["size"]
    other = os.path.relpath(init) if os.path.isabs(init) else os.path.abspath(init)
    code, _, err = run_main(cli_args(recipe, out, "--resume", "--init", other, "--image-size", str(size), epochs=None), capsys)
    assert code == 0, err
    code, _, err = run_main(cli_args(recipe, copy_run(one_epoch_run["out"], tmp_path / "run2"), "--resume", "--image-size", str(size + 8),
                                     epochs=None), capsys)
    assert_one_line_error(code, err, f"--image-size {size + 8}", f"(--image-size {size})")
