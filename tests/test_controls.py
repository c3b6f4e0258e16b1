"""The training controls users of timm / torchvision's reference scripts expect (issue 12, items 1-6),
each on a real small run: optimiser and schedule, gradient clipping, EMA, CutMix/Mixup of stored crops
and rows, speed switches, cluster-readable logs, best/epoch checkpoints. Real stores, DALI on CPU,
real torch steps; no mocks."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from mealkd.distill.mixing import MixPolicy, mix
from mealkd.distill.optimization import lr_factor
from mealkd.distill.trainer import Trainer
from tests.test_recipe import cli_args, config, recipe, run_main  # noqa: F401 - `recipe` is a fixture
from mealkd.errors import UserError
from tests.test_reliability_common import cli

STUDENT = "torchvision:mobilenet_v3_small"


def test_lr_factor_warms_up_linearly_then_follows_the_schedule_per_step():
    kw = dict(steps_per_epoch=10, epochs=5, warmup_epochs=1.0)
    cosine = [lr_factor(s, milestones=None, **kw) for s in range(50)]
    assert cosine[0] == pytest.approx(0.01) and cosine[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert cosine[10] == pytest.approx(1.0)
    assert cosine[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:]))  # decreases every step, not every epoch
    steps = [lr_factor(s, milestones=[2, 4], **kw) for s in range(50)]
    assert steps[19] == 1.0 and steps[20] == pytest.approx(0.1) and steps[40] == pytest.approx(0.01)


def test_adamw_warmup_and_per_step_schedule_in_a_real_run(recipe, tmp_path):
    trainer = Trainer(config(recipe, tmp_path / "run", student=STUDENT, init="scratch", opt="adamw", warmup_epochs=1.0, epochs=3, lr=1e-3))
    try:
        steps = trainer.loader.steps_per_epoch()
        records = trainer.run()
        assert isinstance(trainer.optimizer, torch.optim.AdamW)
        state = next(iter(trainer.optimizer.state.values()))
        assert "exp_avg" in state and "exp_avg_sq" in state
    finally:
        trainer.close()
    # the lr each epoch's last step trained with
    want = [1e-3 * lr_factor((e + 1) * steps - 1, steps_per_epoch=steps, epochs=3, warmup_epochs=1.0, milestones=None) for e in range(3)]
    assert [r["lr"] for r in records] == pytest.approx(want)


def test_norm_and_bias_parameters_skip_weight_decay_and_cosine_ends_at_min_lr(recipe, tmp_path):
    """timm's defaults a ViT user expects: --weight-decay decays weight matrices and kernels, not the 1-D
    normalisation weights and biases (--norm-bias-weight-decay, default 0); --min-lr is where the cosine ends.
    A run recorded before these flags existed resumes with one parameter group, as it trained."""
    trainer = Trainer(config(recipe, tmp_path / "run", student=STUDENT, init="scratch", opt="adamw", weight_decay=0.05, epochs=2, lr=1e-3,
                             min_lr=1e-4))
    try:
        decayed, plain = trainer.optimizer.param_groups
        assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
        assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
        norm_and_bias = {id(p) for name, p in trainer.model.named_parameters() if name.endswith("bias") or p.ndim == 1}
        assert {id(p) for p in plain["params"]} == norm_and_bias and norm_and_bias
        steps = trainer.optimizer_steps_per_epoch
        records = trainer.run()
    finally:
        trainer.close()
    want_last = 1e-3 * lr_factor(2 * steps - 1, steps_per_epoch=steps, epochs=2, warmup_epochs=0.0, milestones=None, floor=0.1)
    assert records[-1]["lr"] == pytest.approx(want_last) and want_last > 1e-4  # the last step's lr, above the floor
    assert lr_factor(10**6, steps_per_epoch=steps, epochs=2, warmup_epochs=0.0, milestones=None, floor=0.1) == pytest.approx(0.1)
    trainer = Trainer(config(recipe, tmp_path / "alike", student=STUDENT, init="scratch", opt="adamw", weight_decay=0.05, norm_bias_weight_decay=0.05))
    try:
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05]
    finally:
        trainer.close()
    from pathlib import Path

    from mealkd.distill.config import as_record, resumed_config

    recorded = as_record(config(recipe, tmp_path / "old", weight_decay=0.05))
    del recorded["norm_bias_weight_decay"], recorded["min_lr"]
    resumed = resumed_config(config(recipe, tmp_path / "old", resume=True), recorded, set(), Path(tmp_path / "old" / "checkpoint.pt"))
    assert (resumed.norm_bias_weight_decay, resumed.min_lr, resumed.weight_decay) == (None, 0.0, 0.05)
    for bad, needle in ((dict(min_lr=0.5, lr=0.1), "--min-lr 0.5"), (dict(min_lr=1e-4, schedule="step:1"), "--schedule step:1"),
                        (dict(norm_bias_weight_decay=-1.0), "--norm-bias-weight-decay -1.0"),
                        (dict(lr=float("nan")), "--lr nan: learning rates must be finite"), (dict(lr=float("inf")), "--lr inf"),
                        (dict(schedule="step:2,1"), "--schedule step:2,1: milestones must increase"),
                        (dict(schedule="step:1,9"), "--schedule step:1,9: milestones must increase and lie below --epochs")):
        with pytest.raises(UserError, match=re.escape(needle)):
            config(recipe, tmp_path / "bad", **bad).validate()


def test_clip_grad_bounds_the_update(recipe, tmp_path):
    """One SGD step at lr 1 (no momentum yet) moves the weights by exactly the clipped gradient."""
    moved = {}
    for clip in (None, 1e-3):
        trainer = Trainer(config(recipe, tmp_path / f"clip{clip}", lr=1.0, clip_grad=clip, discriminator="off"))
        try:
            before = [p.detach().clone() for p in trainer.model.parameters()]
            trainer.ddp_model.train()
            trainer.train_step(next(iter(trainer.loader.epoch(0))))
            delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
            moved[clip] = float(delta.norm())
        finally:
            trainer.close()
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[None] > 10 * moved[1e-3]


def test_the_ema_starts_at_the_init(recipe, tmp_path):
    """As timm's ModelEma: after one step at decay d the EMA is d x init + (1 - d) x the stepped weights
    (torch's AveragedModel alone copies the model at its first update: the init was never in the average)."""
    trainer = Trainer(config(recipe, tmp_path / "run", student=STUDENT, init="scratch", ema_decay=0.5, discriminator="off"))
    try:
        init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.ddp_model.train()
        trainer.train_step(next(iter(trainer.loader.epoch(0))))
        stepped, ema = trainer.model.state_dict(), trainer.ema.module.state_dict()
        floats = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, stepped[k])]
        assert floats
        for k in floats:
            torch.testing.assert_close(ema[k], 0.5 * init[k] + 0.5 * stepped[k])
    finally:
        trainer.close()


def test_ema_is_validated_saved_and_resumed_exactly(recipe, tmp_path):
    """--ema-decay: EMA weights are validated beside the raw ones, saved in checkpoints (with the update
    count), and a run killed after epoch 1 and resumed ends with the same EMA as a straight run."""
    args = lambda out: cli_args(recipe, out, "--ema-decay", "0.9", "--val", str(recipe["val"]), init="scratch", epochs=2)  # noqa: E731
    straight = cli(*args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = cli(*args(tmp_path / "killed"), kill_at="distill-checkpoint:2")
    assert killed.returncode == -9
    resumed = cli(*args(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "killed"))
    assert a["ema_updates"] == b["ema_updates"] == 1 + 2 * 3  # the init, then 24 images / batch 8 = 3 steps per epoch
    for name, value in a["ema"].items():
        assert torch.equal(value, b["ema"][name]), name
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())
    record = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_top1", "val_ema_top1", "val_ema_top5"} <= set(record)
    # evaluate picks either; 'auto' is the EMA; each equals what the run measured for those weights
    from mealkd.distill.checkpoint_eval import evaluate_checkpoint

    ckpt = str(tmp_path / "straight" / "checkpoint.pt")
    got = {w: evaluate_checkpoint(str(recipe["val"]), ckpt, weights=w) for w in ("raw", "ema", "auto")}
    assert (got["raw"]["weights"], got["ema"]["weights"], got["auto"]["weights"]) == ("raw", "ema", "ema")
    assert got["raw"]["top1"] == record["val_top1"] and got["ema"]["top1"] == got["auto"]["top1"] == record["val_ema_top1"]
    from mealkd.distill.export import export_checkpoint

    export_checkpoint(ckpt, "state-dict", str(tmp_path / "ema.pth"), weights="ema")
    exported = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert all(torch.equal(exported[k], a["ema"][k]) for k in exported)

    # --init from such a checkpoint starts from its EMA weights (what its validation chose) unless told
    # otherwise; it used to take the raw ones silently
    student = "torchvision:mobilenet_v3_small"
    for choice, want in (("auto", a["ema"]), ("ema", a["ema"]), ("raw", a["model"])):
        trainer = Trainer(config(recipe, tmp_path / f"from-{choice}", student=student, init=ckpt, init_weights=choice))
        try:
            assert all(torch.equal(v, want[k]) for k, v in trainer.model.state_dict().items()), choice
            assert trainer.run_info["init_weights"] == ("raw" if choice == "raw" else "ema")
            assert ("(its EMA weights)" in trainer.describe()) == (choice != "raw")
        finally:
            trainer.close()
    with pytest.raises(UserError, match="--init-weights ema: --init .*ema.pth holds no EMA weights"):
        Trainer(config(recipe, tmp_path / "from-plain", student=student, init=str(tmp_path / "ema.pth"), init_weights="ema"))


def first_batch(recipe, tmp_path):
    """The first training batch (6 images) the real loader yields for the recipe store."""
    trainer = Trainer(config(recipe, tmp_path / "run", batch_size=6))
    try:
        return next(iter(trainer.loader.epoch(0)))
    finally:
        trainer.close()


def test_cutmix_pastes_the_partner_box_and_mixes_rows_by_its_area(recipe, tmp_path):
    batch = first_batch(recipe, tmp_path)
    torch.manual_seed(3)
    mixed, kind, lam = mix(batch, MixPolicy(cutmix=1.0), num_classes=3)
    assert kind == "cutmix" and 0 < lam < 1
    pair = batch.images.flip(0)
    inside = (mixed.images == pair).all(dim=(0, 1))  # (S, S): pixels taken from the partner
    ys, xs = torch.nonzero(inside, as_tuple=True)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    assert inside[box[0]:box[1], box[2]:box[3]].all() and int(inside.sum()) == (box[1] - box[0]) * (box[3] - box[2])
    assert torch.equal(mixed.images[..., ~inside], batch.images[..., ~inside])
    assert lam == pytest.approx(1 - inside.sum().item() / inside.numel())
    torch.testing.assert_close(mixed.labels, lam * batch.labels + (1 - lam) * batch.labels.flip(0))
    onehot = torch.nn.functional.one_hot(batch.classes, 3).float()
    torch.testing.assert_close(mixed.classes, lam * onehot + (1 - lam) * onehot.flip(0))


def test_mixup_blends_pixels_and_rows_with_one_weight(recipe, tmp_path):
    batch = first_batch(recipe, tmp_path)
    torch.manual_seed(0)
    mixed, kind, lam = mix(batch, MixPolicy(mixup=1.0), num_classes=3)
    assert kind == "mixup" and 0 < lam < 1
    torch.testing.assert_close(mixed.images, lam * batch.images + (1 - lam) * batch.images.flip(0))
    torch.testing.assert_close(mixed.labels, lam * batch.labels + (1 - lam) * batch.labels.flip(0))
    assert mix(batch, MixPolicy(), 3)[1] == "none"


def test_mixing_trains_with_the_hard_label_term(recipe, tmp_path, capsys):
    code, _, err = run_main(cli_args(recipe, tmp_path / "run", "--cutmix", "0.5", "--mixup", "0.5", "--hard-label-weight", "0.3", init="scratch", epochs=1), capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert np.isfinite(record["loss"]) and record["hard_loss"] > 0
    code, _, err = run_main(cli_args(recipe, tmp_path / "bad", "--cutmix", "0.7", "--mixup", "0.7", init="scratch"), capsys)
    assert code == 2 and "--cutmix 0.7 + --mixup 0.7" in err


def test_channels_last_on_cpu_and_compile_train(recipe, tmp_path):
    trainer = Trainer(config(recipe, tmp_path / "cl", student=STUDENT, init="scratch", epochs=1, channels_last="on"))
    try:
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert np.isfinite(trainer.run()[0]["loss"])
    finally:
        trainer.close()
    with pytest.raises(UserError, match="--compile: the student .* is a TorchScript file"):
        Trainer(config(recipe, tmp_path / "ts", epochs=1, compile=True))
    # aot_eager: the real torch.compile path (Dynamo graph capture, AOT autograd) without inductor's
    # kernel generation, which takes minutes on this 2-core machine
    trainer = Trainer(config(recipe, tmp_path / "compiled", student=STUDENT, init="scratch", epochs=1, compile=True,
                             compile_backend="aot_eager", discriminator="off"))
    try:
        assert trainer.forward_model is not trainer.ddp_model
        eager = Trainer(config(recipe, tmp_path / "eager", student=STUDENT, init="scratch", epochs=1, discriminator="off"))
        try:
            batch = next(iter(trainer.loader.epoch(0)))
            trainer.ddp_model.eval()
            eager.model.eval()
            with torch.no_grad():  # the same seed built the same weights: compiled == eager forward
                torch.testing.assert_close(trainer.forward_model(batch.images), eager.model(batch.images), rtol=1e-4, atol=1e-5)
        finally:
            eager.close()
        assert np.isfinite(trainer.run()[0]["loss"])
    finally:
        trainer.close()


def test_a_kill_between_an_epoch_snapshot_and_the_checkpoint_loses_neither(recipe, tmp_path):
    """--keep-every 1: epoch_0001.pt is written before checkpoint.pt, so a SIGKILL between them leaves the previous
    checkpoint and the resume writes both (epoch_0001.pt was lost for good when it came second). A temp file a
    killed save left is removed at the next start, under --out's lock; a second distill on that --out is refused."""
    out = tmp_path / "run"
    args = cli_args(recipe, out, "--keep-every", "1", init="scratch", epochs=2)
    killed = cli(*args, kill_at="distill-copy:1")
    assert killed.returncode == -9
    assert (out / "epoch_0001.pt").exists() and not (out / "checkpoint.pt").exists()
    (out / ".checkpoint.abc123.tmp.pt").write_bytes(b"half a checkpoint")  # what a SIGKILL inside a save leaves
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == [
        "checkpoint.pt", "config.json", "epoch_0001.pt", "epoch_0002.pt", "metrics.jsonl"]
    from mealkd.core.file_lock import FileLock

    with FileLock(out / ".lock", busy=str, unwritable=str):  # as a running distill holds it
        busy = cli(*args, "--resume")
    assert busy.returncode == 2 and busy.stderr.strip().splitlines() == [
        f"error: --out {out}: another distill (pid {os.getpid()}) is running in this directory; wait for it to end or choose another --out"]


def test_cluster_logs_best_and_epoch_checkpoints(recipe, tmp_path):
    """Off a terminal: plain progress lines every --log-every steps; --eval-every 2 validates epochs 2 and 4
    (the last) only; --keep-every 2 keeps epoch_0002.pt and epoch_0004.pt; best.pt is the best validated epoch."""
    out = tmp_path / "run"
    done = cli(*cli_args(recipe, out, "--val", str(recipe["val"]), "--eval-every", "2", "--keep-every", "2", "--log-every", "2",
                         init="scratch", epochs=4))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("epoch ") and " step " in line]
    assert lines[0].startswith("epoch 1/4 step 2/3: loss ") and "crops/s" in lines[0] and "epoch ends in" in lines[0]
    summaries = [line for line in done.stderr.splitlines() if line.startswith("epoch ") and ": loss" in line and " step " not in line]
    assert [("3 epochs left" in s, "2 epochs left" in s, "1 epoch left" in s, "left, ~" in s) for s in summaries] == [
        (True, False, False, True), (False, True, False, True), (False, False, True, True), (False, False, False, False)]  # the run's ETA
    assert sum(" step 3/3:" in line for line in lines) == 4  # the last step of each epoch is always shown
    assert "\x1b[" not in done.stderr  # no terminal escape codes in a log file
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in records] == [False, True, False, True]
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0004.pt"]
    best_epoch = max((r for r in records if "val_top1" in r), key=lambda r: r["val_top1"])["epoch"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch and best["best"]["epoch"] == best_epoch
    assert torch.load(out / "epoch_0002.pt", weights_only=True)["epoch"] == 2


def test_tensorboard_scalars_or_a_one_line_hint_and_discriminator_off_lines(recipe, tmp_path, capsys):
    """--tensorboard writes events (or says how to install it). With --discriminator off the progress and
    epoch lines say nothing of D (they showed 'D 0.000 (acc 0%)'); metrics.jsonl keeps d_loss = d_acc = 0,
    which scripts read."""
    args = cli_args(recipe, tmp_path / "run", "--tensorboard", "--discriminator", "off", "--log-every", "1", init="scratch", epochs=1)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        code, _, err = run_main(args, capsys)
        assert code == 2 and "pip install tensorboard" in err
        return
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    lines = [line for line in err.splitlines() if line.startswith("epoch ") and ": loss" in line]
    assert len(lines) >= 2 and any(" step " not in line for line in lines), err  # step lines and the epoch line
    assert not any(" D " in line or "(acc " in line for line in lines), lines
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (record["d_loss"], record["d_acc"]) == (0.0, 0.0)


def test_val_protocol_flags_reach_distill_validation(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(cli_args(recipe, out, "--val", str(recipe["val"]), "--resize-size", "24", "--interpolation", "bicubic",
                                     init="scratch", epochs=1), capsys)
    assert code == 0, err
    protocol = json.loads((out / "config.json").read_text())["val_protocol"]
    assert protocol["resize_shorter"] == 24 and protocol["interpolation"] == "bicubic"
    code, _, err = run_main(cli_args(recipe, tmp_path / "bad", "--val", str(recipe["val"]), "--resize-size", "8", init="scratch"), capsys)
    assert code == 2 and "--resize-size 8" in err


# ---------------------------------------------------------------------------------------------
# --grad-accum-steps: N batches make one optimiser step
# ---------------------------------------------------------------------------------------------
def test_grad_accum_equals_one_batch_that_many_times_larger(recipe, tmp_path):
    """Batch 4 x 2 accumulated vs batch 8, on the BatchNorm- and dropout-free TorchScript student: the
    same 8 images per optimiser step (the epoch's permutation does not depend on the batch size), each
    half's loss weighted 1/2, so the same gradients up to float32 summation order. After 2 epochs (6
    optimiser steps, 12 batches) weights, discriminator, lr and logged losses agree to 1e-5."""
    results = {}
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        trainer = Trainer(config(recipe, tmp_path / name, batch_size=batch, grad_accum_steps=accum))
        try:
            records = trainer.run()
            results[name] = (records, {k: v.clone() for k, v in trainer.model.state_dict().items()},
                             {k: v.clone() for k, v in trainer.disc.state_dict().items()}, trainer.scheduler.last_epoch)
        finally:
            trainer.close()
    (big, big_model, big_d, big_steps), (acc, acc_model, acc_d, acc_steps) = results["big"], results["accum"]
    assert big_steps == acc_steps == 6  # the schedule counts optimiser steps
    start = torch.jit.load(str(recipe["tiny"])).state_dict()
    for name, value in big_model.items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        torch.testing.assert_close(acc_model[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in big_d.items():
        torch.testing.assert_close(acc_d[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(acc, big):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        for key in ("loss", "d_loss", "teacher_agreement"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)


def test_logged_means_weigh_each_batch_by_its_crops(recipe, tmp_path):
    """The epoch's logged losses are means per crop, as timm's meters: the short last batch counts for its
    crops (it counted as a whole batch, so batch 8 and batch 4 x 2 accumulated logged different losses
    for the same training). With --grad-accum-steps, TensorBoard's step points come at optimiser steps."""
    trainer = Trainer(config(recipe, tmp_path / "run", batch_size=7, discriminator="off"))
    seen: list[tuple[float, int]] = []
    step = trainer.train_step

    def spy(batch, **kwargs):
        values = step(batch, **kwargs)
        seen.append((float(values[0]), batch.images.shape[0]))
        return values

    trainer.train_step = spy
    try:
        record = trainer.train_epoch(0, lambda *args: None)
    finally:
        trainer.close()
    sizes = [n for _, n in seen]
    assert len(set(sizes)) > 1, sizes  # 24 images in batches of 7: a short last batch
    weighted = sum(loss * n for loss, n in seen) / sum(sizes)
    assert record["loss"] == pytest.approx(weighted, rel=1e-9)
    assert record["loss"] != pytest.approx(sum(loss for loss, _ in seen) / len(seen), rel=1e-9)


def test_tensorboard_step_points_wait_for_the_optimiser_step(recipe, tmp_path):
    """Batch 4 x 2 accumulated, --log-every 3: 6 batches, 3 optimiser steps. The refresh after batch 3 falls
    inside a step, so its point is written when that step ends (x = 2); it was dropped, which left one point
    per lcm(log-every, accumulation) batches (one per 25 optimiser steps at the defaults 50 and 4)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(config(recipe, tmp_path / "run", batch_size=4, grad_accum_steps=2, log_every=3, tensorboard=True, epochs=1))
    try:
        trainer.run()
    finally:
        trainer.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == [2, 3]


def test_a_stop_inside_an_accumulation_group_saves_at_its_end_and_resumes_exactly(recipe, tmp_path):
    """SIGTERM during the first batch of an optimiser step (batch 3 of 6 in epoch 1, groups of 2): the
    run finishes that step, saves after batch 4 (a checkpoint never holds half-accumulated gradients),
    exits 143; --resume ends identical to an uninterrupted run."""
    args = lambda out: ["distill", "--labels", str(recipe["stores"][1]), "--data", str(recipe["tree"]), "--student", str(recipe["tiny"]),  # noqa: E731
                        "--init", "pretrained", "--out", str(out), "--epochs", "2", "--batch-size", "4", "--grad-accum-steps", "2",
                        "--device", "cpu", "--num-threads", "1"]
    straight = cli(*args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    # the run's first line says what it trains: 24 images, 6 batches of 4 per epoch, 3 optimiser steps
    assert "on 24 images" in straight.stderr and "batch 4 x 2 accumulated = global batch 8, 3 optimiser steps per epoch" in straight.stderr
    stopped = cli(*args(tmp_path / "stopped"), kill_at="distill-step:3:TERM")
    assert stopped.returncode == 143, stopped.stderr
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (0, 4) and ckpt["scheduler"]["last_epoch"] == 2
    assert "after step 4/6 of epoch 1" in stopped.stderr
    resumed = cli(*args(tmp_path / "stopped"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch 1 step 4" in resumed.stderr
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in ("straight", "stopped"))
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name, value in a["discriminator"].items():
        assert torch.equal(value, b["discriminator"][name]), name
    changed = cli(*args(tmp_path / "stopped")[:-4], "--grad-accum-steps", "1", "--device", "cpu", "--num-threads", "1", "--resume")
    assert changed.returncode == 2 and "--grad-accum-steps 1" in changed.stderr and "--grad-accum-steps 2" in changed.stderr


def test_grad_accum_steps_below_one_or_above_an_epoch_is_one_line(recipe, tmp_path, capsys):
    code, _, err = run_main(cli_args(recipe, tmp_path / "run", "--grad-accum-steps", "0", init="scratch"), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0] == "error: --grad-accum-steps 0: must be >= 1", err
    assert not (tmp_path / "run").exists()
    # 24 images at batch 8: 3 batches per epoch; 5 would make one 3-batch step per epoch while the start line
    # announced a global batch of 40 (the lr scaled for it): refused
    code, _, err = run_main(cli_args(recipe, tmp_path / "run", "--grad-accum-steps", "5", init="scratch"), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: --grad-accum-steps 5: an epoch has only 3 batch(es) per process"), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sync_bn_is_refused_on_cpu_processes_and_a_no_op_alone(recipe, tmp_path, monkeypatch):
    """--sync-bn (torch.nn.SyncBatchNorm) synchronises CUDA tensors only: a multi-process CPU job is refused in one
    line before its process group forms (SyncBatchNorm raised 'expected input tensor to be on GPU' in the first
    step), printed by rank 0 only; one process has nothing to synchronise and trains plain BatchNorm."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError) as err:
        Trainer(config(recipe, tmp_path / "two", student=STUDENT, init="scratch", sync_bn=True))
    assert err.value.echoed and "--sync-bn: synchronises BatchNorm over GPUs; this job of 2 processes runs on cpu" in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    trainer = Trainer(config(recipe, tmp_path / "one", student=STUDENT, init="scratch", sync_bn=True, epochs=1))
    try:
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.model.modules())
        trainer.run()
    finally:
        trainer.close()
    assert torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["config"]["sync_bn"] is True  # a training flag: --resume keeps it


def test_a_checkpoint_saved_inside_an_epoch_before_per_crop_means_resumes(recipe, tmp_path):
    """Checkpoints written inside an epoch before the sums were weighted by crops hold one sum per SUMS name:
    they resume with the sums converted at this rank's mean batch so far (its planned batches)."""
    from mealkd.distill.trainer import SUMS

    trainer = Trainer(config(recipe, tmp_path / "run", batch_size=7, discriminator="off"))
    try:
        old = torch.arange(1.0, len(SUMS) + 1, dtype=torch.float64)
        crops = sum(trainer.batch_crops[:2])
        converted = trainer._resumed_sums(old, 2)
        torch.testing.assert_close(converted, torch.cat([old * crops / 2, torch.tensor([float(crops)], dtype=torch.float64)]))
        current = torch.cat([old, torch.tensor([14.0], dtype=torch.float64)])
        assert torch.equal(trainer._resumed_sums(current, 2), current)  # today's format is taken as saved
    finally:
        trainer.close()


def test_a_resume_by_another_process_count_keeps_the_global_batch():
    """--batch-size is per process: a run requeued on another number of processes regroups its global batch
    (the fewest accumulation steps whose per-process batch fits the recorded one), or takes the user's
    --batch-size/--grad-accum-steps if their product is the run's; other training flags stay refused."""
    from pathlib import Path

    from mealkd.distill.config import DistillConfig, resumed_config, split_global_batch

    assert split_global_batch(64, 1, 8, 4) == (64, 2)    # 8 GPUs -> 4: the same memory per process, 2 accumulated
    assert split_global_batch(64, 1, 4, 8) == (32, 1)    # 4 -> 8: half the batch per process
    assert split_global_batch(64, 2, 4, 8) == (64, 1)    # accumulation given back first
    assert split_global_batch(48, 1, 2, 3) == (32, 1)
    assert split_global_batch(4, 1, 2, 3) is None        # 8 images over 3 processes
    assert split_global_batch(32, 1, 16, 8) == (32, 2)   # back from 16 GPUs to 8 ...
    assert split_global_batch(32, 1, 16, 8, cap=64) == (64, 1)  # ... at the 64 per process the run started with (run_info)
    ckpt = Path("/runs/a/checkpoint.pt")
    base = dict(labels="s", data="d", student="torchvision:resnet18", init="scratch", out="/runs/a")
    recorded = {"batch_size": 64, "grad_accum_steps": 1, "lr": 0.1, "student": "torchvision:resnet18", "init": "scratch"}
    cfg = resumed_config(DistillConfig(**base, batch_size=64, lr=0.1), recorded, {"batch_size", "lr"}, ckpt, worlds=(8, 4))
    assert (cfg.batch_size, cfg.grad_accum_steps) == (64, 2)
    cfg = resumed_config(DistillConfig(**base, batch_size=32, grad_accum_steps=4), recorded, {"batch_size", "grad_accum_steps"}, ckpt, worlds=(8, 4))
    assert (cfg.batch_size, cfg.grad_accum_steps) == (32, 4)
    with pytest.raises(UserError, match=r"^--batch-size 32 x 4 process\(es\) x --grad-accum-steps 1 = 128 images per optimiser step; "
                                        r"the run in /runs/a trained with 512 \(64 x 8 x 1\): keep that product \(e.g. --batch-size 64 --grad-accum-steps 2\)"):
        resumed_config(DistillConfig(**base, batch_size=32), recorded, {"batch_size"}, ckpt, worlds=(8, 4))
    with pytest.raises(UserError, match=r"^--batch-size 32: --resume continues the run in /runs/a exactly as recorded"):
        resumed_config(DistillConfig(**base, batch_size=32), recorded, {"batch_size"}, ckpt, worlds=(8, 8))  # same count: as before
    with pytest.raises(UserError, match=r"^--lr 0.2: --resume continues"):
        resumed_config(DistillConfig(**base, lr=0.2), recorded, {"lr"}, ckpt, worlds=(8, 4))
    with pytest.raises(UserError, match=r"global batch of 512 .* does not split over 7 process\(es\); resume it with a process count that divides 512"):
        resumed_config(DistillConfig(**base), recorded, set(), ckpt, worlds=(8, 7))


def test_a_diverged_run_stops_in_one_line_and_saves_nothing(recipe, tmp_path, capsys):
    """A loss gone NaN/inf (lr far too high; a user review's exported student with huge logits) trained on and
    saved NaN weights with exit 0, which evaluate then scored at chance and export blamed on itself."""
    from tests.test_recipe import assert_one_line_error

    out = tmp_path / "run"
    code, _, err = run_main(cli_args(recipe, out, "--lr", "1e30", "--discriminator", "off", init="scratch", epochs=2), capsys)
    line = assert_one_line_error(code, err, "distill: training diverged: the loss is", "of epoch 1", "nothing was saved. Lower --lr")
    assert "--init" not in line  # no checkpoint to start from (it pointed at one)
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    # a save right after the update that broke the weights: the loss measured before it was finite, so the weights
    # themselves are checked (it saved weights of 1e29 and called them "the last good point"; a user review)
    out = tmp_path / "saves"
    code, _, err = run_main(cli_args(recipe, out, "--lr", "1e30", "--discriminator", "off", "--checkpoint-minutes", "0.000001",
                                     init="scratch", epochs=2), capsys)
    assert_one_line_error(code, err, "distill: training diverged: the student's outputs are not finite by step 1 of epoch 1",
                          "nothing was saved")
    assert not (out / "checkpoint.pt").exists()
