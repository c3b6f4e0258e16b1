"""Stage two end to end: crop replay, epoch coverage/sharding, training, resume, DDP, CLI errors, plot.

Everything is real: a JPEG ImageFolder on disk, a label store written by a real precompute (two
teachers: a TorchScript "colour" net whose softmax follows the class tint, and a random torchvision
resnet18 state dict), DALI pipelines on the CPU, torch training steps, subprocesses of ``cli.py``
(and ``torch.distributed.run`` with gloo for DDP). No mocks.

The shared fixture (built once per module) is 3 classes x 8 JPEGs (24-48 px) plus one corrupt file
that precompute excludes with ``--skip-bad``: 24 usable images, R = 4 stored crops each at 16 px.
Torch runs single-threaded here (and OMP_NUM_THREADS=1 in subprocesses): the machine has two cores
shared with other jobs, and oversubscribed intra-op threads make every step many times slower.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from mealkd import storage
from mealkd.core.dali_io import resolve_backend
from mealkd.core.dataset import scan_image_folder
from mealkd.core.distributed import Dist
from mealkd.core.replay import Normalization
from mealkd.distill.loader import ReplayLoader
from mealkd.precompute.crops import CropStream
from mealkd.precompute.runner import PrecomputeConfig, run_precompute
from tests.datagen import make_jpeg_tree

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, R, SIZE = 3, 8, 4, 16
USABLE = CLASSES * PER_CLASS
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
CPU = resolve_backend("cpu")


# ---------------------------------------------------------------------------------------------
# models made in the test
# ---------------------------------------------------------------------------------------------
class ColourNet(torch.nn.Module):
    """Teacher: logits = 4 x per-channel mean (the tree tints class k's channel k % 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * x.mean(dim=(2, 3))


class TinyNet(torch.nn.Module):
    """Student without BatchNorm or dropout: DDP replicas then equal a 1-process run up to fp rounding."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distill")
    tree = make_jpeg_tree(root / "train", CLASSES, PER_CLASS, seed=0)
    (tree / "class_1" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 4)
    val = make_jpeg_tree(root / "val", CLASSES, 3, seed=1)
    torch.manual_seed(0)
    torch.jit.script(ColourNet()).save(str(root / "colour.pt"))
    torch.save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), root / "r18.pth")
    torch.manual_seed(1)
    torch.jit.script(TinyNet()).save(str(root / "tiny.pt"))
    store = root / "store.zarr"
    run_precompute(
        PrecomputeConfig(
            data=str(tree),
            teachers=f"{root / 'colour.pt'}:size={SIZE},torchvision:resnet18@{root / 'r18.pth'}:w=0.25",
            out=str(store),
            crops_per_image=R,
            image_size=SIZE,
            batch_size=16,
            device="cpu",
            skip_bad=True,
            images_per_shard=8,
            num_threads=1,
        )
    )
    index = scan_image_folder(tree)
    opened = storage.open_store(str(store), fingerprint=index.fingerprint, class_names=index.class_names)
    assert int((~opened.excluded).sum()) == USABLE and opened.excluded.sum() == 1
    return {"root": root, "tree": tree, "val": val, "store": store, "index": index, "labels": opened, "tiny": root / "tiny.pt"}


NORM = Normalization(size=SIZE)


def reference_crops(world) -> dict[tuple[int, int], torch.Tensor]:
    """(image id, crop slot) -> tensor, from stage one's path (decode once + fn.slice)."""
    store, index = world["labels"], world["index"]
    usable = np.flatnonzero(~store.excluded)
    stream = CropStream(index, [NORM], CPU, batch_size=16, num_threads=1)
    ref = {}
    for batch in stream.batches(usable.tolist(), usable.tolist(), store.windows, store.flips):
        for row, crop, tensor in zip(batch.rows.tolist(), batch.crops.tolist(), batch.inputs[0]):
            ref[(row, crop)] = tensor.clone()
    assert len(ref) == USABLE * R
    return ref


@pytest.fixture(scope="module")
def reference(world):
    ref = reference_crops(world)
    by_pixels = {t.numpy().tobytes(): key for key, t in ref.items()}
    assert len(by_pixels) == len(ref), "two stored crops have identical pixels; pick another seed"
    return ref, by_pixels


def replay_epoch(loader: ReplayLoader, epoch: int, by_pixels: dict, store) -> list[tuple[int, int]]:
    """Run one epoch; identify every yielded crop by its pixels; check it is the planned crop and
    that its label row is the stored one. Returns the (image, slot) ids in yielded order."""
    ids, slots, k = loader.images(epoch), loader.slots(epoch), loader.crops_per_step
    seen: list[tuple[int, int]] = []
    position = 0
    for images, labels, _ in loader.epoch(epoch):
        assert images.shape[0] == labels.shape[0] and images.shape[0] % k == 0
        assert images.dtype == torch.float32 and tuple(images.shape[1:]) == (3, SIZE, SIZE)
        planned = [(int(ids[position + b]), slots[j]) for b in range(images.shape[0] // k) for j in range(k)]
        found = [by_pixels.get(t.numpy().tobytes()) for t in images]
        assert found == planned, f"epoch {epoch}: yielded pixels are not the planned stored crops"
        want = store.labels(np.array([p[0] for p in planned]), np.array([p[1] for p in planned]))
        assert labels.dtype == torch.float32
        np.testing.assert_array_equal(labels.numpy(), want)
        position += images.shape[0] // k
        seen.extend(found)
    assert position == len(ids)
    return seen


# ---------------------------------------------------------------------------------------------
# 1 + 2: pixel identity, labels, epoch coverage, sharding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_replay_pixels_labels_and_coverage(world, reference, k):
    """The loader yields bit-identical pixels to stage one for every stored (image, crop), with the
    stored label rows, and over R/K epochs uses each stored crop of each usable image exactly once."""
    ref, by_pixels = reference
    store = world["labels"]
    loader = ReplayLoader(store, world["index"], NORM, CPU, batch_size=5, crops_per_step=k, seed=3, num_threads=1)
    try:
        used: list[tuple[int, int]] = []
        for epoch in range(R // k):
            used += replay_epoch(loader, epoch, by_pixels, store)
        assert len(used) == len(set(used)) == USABLE * R
        assert set(used) == set(ref)  # the corrupt (excluded) image never appears
        # epoch R/K starts the cycle again (same crops, different order)
        again = replay_epoch(loader, R // k, by_pixels, store)
        assert sorted(again) == sorted(used[: USABLE * k])
        assert [i for i, _ in again[::k]] != [i for i, _ in used[: USABLE * k : k]]
    finally:
        loader.close()


def test_two_ranks_shard_disjointly(world, reference):
    """Two in-process ranks (the sharding is pure arithmetic): per epoch, disjoint shards covering
    every usable image once, equal step counts, and real iteration on each rank yields its shard."""
    _, by_pixels = reference
    store = world["labels"]
    loaders = [ReplayLoader(store, world["index"], NORM, CPU, batch_size=4, seed=7, dist=Dist(rank=r, world_size=2), num_threads=1) for r in range(2)]
    try:
        usable = set(np.flatnonzero(~store.excluded).tolist())
        for epoch in range(3):
            shards = [loader.images(epoch) for loader in loaders]
            assert len(shards[0]) == len(shards[1]) == USABLE // 2
            assert not set(shards[0].tolist()) & set(shards[1].tolist())
            assert set(shards[0].tolist()) | set(shards[1].tolist()) == usable
        assert loaders[0].steps_per_epoch() == loaders[1].steps_per_epoch() == 3
        seen = [replay_epoch(loader, 1, by_pixels, store) for loader in loaders]
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == {(i, 1) for i in usable}
    finally:
        for loader in loaders:
            loader.close()


@pytest.mark.parametrize("world_size", [5, 7])
def test_uneven_shards_pad_by_wrapping(world, world_size):
    """24 images over 5 (7) ranks: every rank gets ceil(24/5) = 5 (4) images; the padding repeats
    the first images of the epoch's permutation (like DistributedSampler), so all ranks run the
    same number of steps and every image is still visited."""
    store = world["labels"]
    per_rank = -(-USABLE // world_size)
    loaders = [ReplayLoader(store, world["index"], NORM, CPU, batch_size=2, seed=1, dist=Dist(rank=r, world_size=world_size), num_threads=1) for r in range(world_size)]
    try:
        order = ReplayLoader(store, world["index"], NORM, CPU, batch_size=2, seed=1, num_threads=1).images(4)
        shards = [loader.images(4) for loader in loaders]
        assert {len(s) for s in shards} == {per_rank}
        assert len({loader.steps_per_epoch() for loader in loaders}) == 1
        flat = np.concatenate(shards)
        assert set(flat.tolist()) == set(order.tolist())
        counts = np.bincount(flat, minlength=len(store.excluded))
        extra = per_rank * world_size - USABLE
        assert sorted(np.flatnonzero(counts == 2).tolist()) == sorted(order[:extra].tolist())
        assert counts.max() <= 2 and (counts == 2).sum() == extra
    finally:
        for loader in loaders:
            loader.close()


# ---------------------------------------------------------------------------------------------
# 3: the loss through the trainer
# ---------------------------------------------------------------------------------------------
def soft_ce(model: torch.nn.Module, loader: ReplayLoader, epoch: int) -> float:
    """Mean soft cross-entropy -sum p log q over one epoch's crops (computed here, not by distill.losses)."""
    total = count = 0.0
    with torch.no_grad():
        for images, probs, _ in loader.epoch(epoch):
            total += float(-(probs * torch.log_softmax(model(images), dim=1)).sum())
            count += images.shape[0]
    return total / count


def test_trainer_steps_decrease_soft_ce(world, tmp_path):
    from mealkd.distill.trainer import DistillConfig, Trainer

    cfg = DistillConfig(
        labels=str(world["store"]), data=str(world["tree"]), student=str(world["tiny"]), init="pretrained",
        out=str(tmp_path / "run"), epochs=4, batch_size=4, lr=0.08, num_threads=1, device="cpu",
    )
    trainer = Trainer(cfg)
    try:
        before = soft_ce(trainer.model, trainer.loader, 0)
        records = trainer.run()
        probe = ReplayLoader(world["labels"], world["index"], trainer.norm, CPU, batch_size=8, num_threads=1)
        after = soft_ce(trainer.model, probe, 0)
        probe.close()
    finally:
        trainer.close()
    assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
    assert after < 0.8 * before, (before, after)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["teacher_agreement"] > records[0]["teacher_agreement"] or records[0]["teacher_agreement"] == 1.0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 4: resume after kill -9 == uninterrupted (CPU)
# ---------------------------------------------------------------------------------------------
def distill_args(world, out: Path, *extra: str, student="torchvision:mobilenet_v3_small", init="scratch", epochs=4, batch_size=4) -> list[str]:
    return [
        "distill", "--labels", str(world["store"]), "--data", str(world["tree"]), "--student", student, "--init", init,
        "--out", str(out), "--epochs", str(epochs), "--batch-size", str(batch_size), "--num-threads", "1", "--device", "cpu", *extra,
    ]


def cli_run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a, b, where=""):
    """Exact equality of nested dicts/lists of tensors (state dicts, optimizer states)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Background:
    """A ``cli.py`` subprocess started now and waited for on first use (overlaps the slow imports)."""

    def __init__(self, args: list[str], out: Path):
        self.out = out
        self.proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)

    def result(self) -> Path:
        _, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, err
        return self.out


@pytest.fixture(scope="module")
def straight_run(world) -> Background:
    """4 epochs uninterrupted (mobilenet_v3_small: BatchNorm + dropout, so RNG state matters), with --val."""
    out = world["root"] / "straight"
    return Background(distill_args(world, out, "--val", str(world["val"])), out)


def test_resume_after_kill_matches_straight_run(world, straight_run):
    out = world["root"] / "killed"
    ckpt = out / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *distill_args(world, out, "--val", str(world["val"]))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    inode, landed, deadline = None, 0, time.monotonic() + 240
    try:
        while landed < 3:  # every save is a new file renamed into place: count inode changes (2 per epoch with --val:
            # the training, then the validation; the 3rd is epoch 2's training)
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            try:
                current = os.stat(ckpt).st_ino
            except FileNotFoundError:
                current = None
            if current is not None and current != inode:
                inode, landed = current, landed + 1
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = load_ckpt(ckpt)["epoch"]
    assert killed_at == 2, f"the kill landed after epoch {killed_at}, not 2"
    resumed = cli_run(distill_args(world, out, "--val", str(world["val"]), "--resume"))
    assert resumed.returncode == 0, resumed.stderr

    straight = straight_run.result()
    a, b = load_ckpt(straight / "checkpoint.pt"), load_ckpt(ckpt)
    assert a["epoch"] == b["epoch"] == 4
    for key in ("model", "optimizer", "scheduler", "discriminator", "d_optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, out)]
    assert [r["epoch"] for r in metrics[1]] == [1, 2, 3, 4]
    volatile = {"seconds", "crops_per_s", "loader_wait_s"}
    assert [{k: v for k, v in r.items() if k not in volatile} for r in metrics[0]] == [
        {k: v for k, v in r.items() if k not in volatile} for r in metrics[1]
    ]


# ---------------------------------------------------------------------------------------------
# 4b: a stop signal (SIGTERM / SIGUSR1 / Ctrl-C) saves the exact step; --resume == uninterrupted
# ---------------------------------------------------------------------------------------------
STEPS = USABLE // 4  # steps per epoch of distill_args' runs (batch 4, one process)


@pytest.mark.parametrize(
    "sig,at_step,stopped_at",
    [
        ("TERM", STEPS + 2, (1, 2)),  # inside epoch 2: the checkpoint holds 1 epoch + 2 steps
        ("USR1", 2 * STEPS, (2, 0)),  # at epoch 2's last step: its training is saved and the run stops before validating
    ],
)
def test_stop_signal_saves_the_step_and_resume_matches_straight_run(world, straight_run, tmp_path, sig, at_step, stopped_at):
    """A real signal (sent by the process to itself at an exact step through the test hook) stops the run
    after that step with a checkpoint of that point and exit status 128 + the signal; ``--resume``
    then ends with the same weights, optimiser, D, schedule and per-epoch metrics as the uninterrupted
    run (mobilenet_v3_small: dropout, so the saved RNG state matters; --val)."""
    out = tmp_path / "stopped"
    args = distill_args(world, out, "--val", str(world["val"]))
    env = dict(ENV, MEALKD_TEST_KILL_AT=f"distill-step:{at_step}:{sig}")
    stopped = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    signum = getattr(signal, f"SIG{sig}")
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by SIG{sig}" in last and "--resume" in last, last
    ckpt = load_ckpt(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["epoch_step"]) == stopped_at
    assert ckpt["scheduler"]["last_epoch"] == at_step  # the step it was in was finished, no later one begun
    assert (len(ckpt["ranks"]) if stopped_at[1] else ckpt["ranks"]) == (1 if stopped_at[1] else None)
    if not stopped_at[1]:  # an epoch's end: its validation is left to the resume (it could outlast a grace period)
        assert ckpt["pending_record"]["epoch"] == stopped_at[0] and "val_top1" not in ckpt["pending_record"]
        assert "training" in last and len((out / "metrics.jsonl").read_text().splitlines()) == stopped_at[0] - 1

    resumed = cli_run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    # the epochs this run ended: a pending epoch's validation included (it said "3 epoch(s) trained")
    assert f"distill: epochs {stopped_at[0] if not stopped_at[1] else stopped_at[0] + 1}-4 finished by this run" in resumed.stderr, resumed.stderr
    straight = straight_run.result()
    a, b = load_ckpt(straight / "checkpoint.pt"), load_ckpt(out / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 4 and b["epoch_step"] == 0
    for key in ("model", "optimizer", "scheduler", "discriminator", "d_optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, out)]
    volatile = {"seconds", "crops_per_s", "loader_wait_s"}
    assert [{k: v for k, v in r.items() if k not in volatile} for r in metrics[0]] == [
        {k: v for k, v in r.items() if k not in volatile} for r in metrics[1]
    ]


def test_checkpoint_minutes_saves_inside_epochs_and_a_kill_then_resumes_exactly(world, straight_run, tmp_path):
    """--checkpoint-minutes (here ~0: after every step) writes checkpoints inside epochs; a SIGKILL at
    step 8 (epoch 2, before that step's save) leaves the checkpoint of step 7 (epoch 2 step 1), and
    --resume from it ends identical to the uninterrupted run."""
    out = tmp_path / "killed"
    args = distill_args(world, out, "--val", str(world["val"]), "--checkpoint-minutes", "0.000001")
    killed = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                            env=dict(ENV, MEALKD_TEST_KILL_AT=f"distill-step:{STEPS + 2}"), cwd=REPO, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = load_ckpt(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["scheduler"]["last_epoch"]) == (1, 1, STEPS + 1)
    resumed = cli_run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_ckpt(straight_run.result() / "checkpoint.pt"), load_ckpt(out / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "discriminator", "d_optimizer"):
        assert_same_tensors(a[key], b[key], key)


def test_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(world, tmp_path):
    """Under torchrun (2 ranks, gloo) Ctrl-C reaches only rank 1 here: both ranks agree to stop after the
    same step (one step later), nothing hangs, the checkpoint holds both ranks' RNG states, a resume by
    3 processes, over which the global batch does not split, is refused in one line (once, not per rank; a
    resume by 1 process: test_ddp_two_ranks_match_one_process), and a 2-rank resume equals an uninterrupted
    2-rank run bit for bit (with a checkpoint inside the epoch after every step, agreed the same way)."""
    def launch(out: Path, *extra: str, env=ENV, nproc: int = 2) -> subprocess.CompletedProcess:
        args = distill_args(world, out, *extra, epochs=2)
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        return subprocess.run([sys.executable, *launcher, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)

    straight = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"),
                                 *distill_args(world, tmp_path / "straight", "--log-every", "1", epochs=2)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    out = tmp_path / "stopped"
    every_step = ("--checkpoint-minutes", "0.000001")  # saves inside the epoch too: agreed like the stop, every rank at one step
    stopped = launch(out, *every_step, env=dict(ENV, MEALKD_TEST_KILL_AT="distill-step:1:INT:1"))
    assert stopped.returncode != 0 and "stopped by SIGINT after step 2/3 of epoch 1" in stopped.stderr, stopped.stderr
    ckpt = load_ckpt(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["epoch_step"], len(ckpt["ranks"])) == (0, 2, 2)
    assert not torch.equal(ckpt["ranks"][0]["rng_cpu"], ckpt["ranks"][1]["rng_cpu"])  # per-rank streams

    three = launch(out, "--resume", nproc=3)  # 2 x 4 images per step do not split over 3 processes: refused once, not per rank
    errors = [line for line in three.stderr.splitlines() if line.startswith("error:")]
    assert three.returncode != 0 and len(errors) == 1, three.stderr
    assert "global batch of 8 (--batch-size 4 x 2 process(es) x --grad-accum-steps 1) does not split over 3 process(es)" in errors[0], errors
    resumed = launch(out, "--resume", *every_step)
    assert resumed.returncode == 0, resumed.stderr
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    # the progress lines show the job's running means (they showed rank 0's share): an epoch's last step line
    # says what its epoch line says
    for epoch in (1, 2):
        step_line = next(line for line in err.splitlines() if line.startswith(f"epoch {epoch}/2 step 3/3: loss "))
        epoch_line = next(line for line in err.splitlines() if line.startswith(f"epoch {epoch}: loss "))
        assert step_line.split()[5] == epoch_line.split()[3], (step_line, epoch_line)
    a, b = load_ckpt(tmp_path / "straight" / "checkpoint.pt"), load_ckpt(out / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "discriminator", "d_optimizer"):
        assert_same_tensors(a[key], b[key], key)

    # the way a cluster stops a job: SIGTERM to torchrun's agent, which passes it to both workers
    agent_out = tmp_path / "agent"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"),
                              *distill_args(world, agent_out, epochs=2)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        wait_until_children_catch(agent.pid, signal.SIGTERM, count=2)  # both workers are in the training loop
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode != 0 and "distill: stopped by SIGTERM" in err, err
    resumed = launch(agent_out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    b = load_ckpt(agent_out / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "discriminator", "d_optimizer"):
        assert_same_tensors(a[key], b[key], key)


def wait_until_children_catch(pid: int, signum: int, count: int, timeout: float = 180) -> None:
    """Wait until ``count`` child processes of ``pid`` have a handler for ``signum`` (Linux: SigCgt in
    /proc/PID/status), i.e. until they run the code that catches it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        catching = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid != pid:
                    continue
                status = (stat.parent / "status").read_text()
            except (OSError, IndexError, ValueError):
                continue
            caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
            catching += bool(caught >> (signum - 1) & 1)
        if catching >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {count} children of {pid} caught signal {signum} within {timeout} s")


# ---------------------------------------------------------------------------------------------
# 5: DDP (torch.distributed.run, gloo) == one process with the same global batch
# ---------------------------------------------------------------------------------------------
# Runs the real `cli.py distill` entry point; the only addition is that each rank saves its own
# replica (student + discriminator) when the trainer closes, so the replicas can be compared.
WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import mealkd.distill.trainer as trainer

    original_close = trainer.Trainer.close

    def close(self):
        torch.save({"model": self.model.state_dict(), "disc": self.disc.state_dict()},
                   os.path.join(self.cfg.out, f"replica{self.dist.rank}.pt"))
        original_close(self)

    trainer.Trainer.close = close
    from mealkd import cli
    cli.main(sys.argv[1:])
    """
)


# Each rank saves the weights it validates (the student and its EMA, as handed to evaluate_models).
VALIDATED = textwrap.dedent(
    """
    import os, sys
    import torch
    import mealkd.distill.trainer as trainer

    original = trainer.evaluate_models

    def evaluate_models(models, *args, **kwargs):
        rank = int(os.environ.get("RANK", 0))
        torch.save({name: m.state_dict() for name, m in models.items()}, os.path.join(sys.argv[sys.argv.index("--out") + 1], f"validated{rank}.pt"))
        return original(models, *args, **kwargs)

    trainer.evaluate_models = evaluate_models
    from mealkd import cli
    cli.main(sys.argv[1:])
    """
)


def test_every_rank_validates_the_weights_rank_0_saves(world, tmp_path):
    """DDP sends rank 0's BatchNorm statistics at the start of each forward, so after an epoch each rank's
    last forward has left its own: two ranks validated two different models, neither the saved one.
    Now every rank validates rank 0's buffers: the student and the EMA weights validated on both ranks
    are bit-identical and equal the checkpoint's (mobilenet_v3_small: BatchNorm)."""
    worker = tmp_path / "validated.py"
    worker.write_text(VALIDATED)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
                           *distill_args(world, out, "--val", str(world["val"]), "--ema-decay", "0.5", epochs=1)],
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [torch.load(out / f"validated{r}.pt", weights_only=False) for r in range(2)]
    ckpt = load_ckpt(out / "checkpoint.pt")
    assert any("running_mean" in name for name in ckpt["model"])
    assert_same_tensors(seen[0]["val"], seen[1]["val"], "validated students")
    assert_same_tensors(seen[0]["val_ema"], seen[1]["val_ema"], "validated EMA weights")
    assert_same_tensors(seen[0]["val"], ckpt["model"], "validated vs saved student")
    assert_same_tensors(seen[0]["val_ema"], ckpt["ema"], "validated vs saved EMA")


def test_ddp_two_ranks_match_one_process(world, tmp_path):
    """2 ranks x batch 4 vs 1 process x batch 8 on 24 images (3 global batches of the same 8 images
    per step: the loader's rank r takes positions r, r+2, ... of the same permutation). The student
    has no BatchNorm and no dropout and the discriminator's gradients are all-reduced, so both runs
    compute the same averaged gradient; only the summation order differs (mean of two 4-sample means
    vs one 8-sample mean, then gloo's all-reduce), i.e. float32 rounding: ~1e-7 relative per step.
    After 6 SGD steps we allow 1e-5 relative (+1e-6 absolute) on weights and 1e-5 on the logged losses;
    the validation accuracy, which the two ranks compute on halves of the images, must be the same.
    The two replicas must be bit-identical (DDP broadcasts the initial weights and averages grads).
    A third run, 2 ranks x batch 2 x --grad-accum-steps 2, makes the same optimiser steps (DDP reduces
    only at each group's last batch, under no_sync before it) and must match the same way. A fourth, 2 ranks
    x batch 4 stopped inside epoch 1 and resumed by one process, must too."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = lambda out, bs: distill_args(world, out, "--val", str(world["val"]), student=str(world["tiny"]), init="pretrained", epochs=2, batch_size=bs)  # noqa: E731
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    procs = [
        subprocess.Popen([sys.executable, str(worker), *args(one, 8)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO),
        subprocess.Popen([*torchrun, *args(two, 4)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO),
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    # after the others: two torchrun jobs at once would race for the standalone rendezvous port
    proc = subprocess.run([*torchrun, *args(accum, 2), "--grad-accum-steps", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # requeued on fewer processes: 2 ranks x batch 4 stopped inside epoch 1, resumed by 1 process, which keeps the
    # global batch of 8 as batch 4 x --grad-accum-steps 2 and continues at the same image of the epoch (it was refused)
    moved = tmp_path / "moved"
    proc = subprocess.run([*torchrun, *args(moved, 4)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, timeout=300,
                          env=dict(ENV, MEALKD_TEST_KILL_AT="distill-step:1:TERM"))
    assert proc.returncode != 0 and "stopped by SIGTERM after step 2/3 of epoch 1" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args(moved, 4), "--resume"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed by 1 process(es) (the run: 2): --batch-size 4 x --grad-accum-steps 2 keeps its global batch of 8" in proc.stderr, proc.stderr
    ckpt_moved = load_ckpt(moved / "checkpoint.pt")
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args(two, 4), "--resume"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "has trained all its epochs already; nothing to do" in proc.stdout + proc.stderr, proc.stderr  # was refused
    assert (ckpt_moved["config"]["batch_size"], ckpt_moved["config"]["grad_accum_steps"], ckpt_moved["run_info"]["world_size"]) == (4, 2, 1)

    replicas = [torch.load(two / f"replica{r}.pt", weights_only=False) for r in range(2)]
    assert_same_tensors(replicas[0], replicas[1], "replicas")
    ckpt_two, ckpt_one = load_ckpt(two / "checkpoint.pt"), load_ckpt(one / "checkpoint.pt")
    assert_same_tensors(ckpt_two["model"], replicas[0]["model"], "checkpoint")
    assert ckpt_two["epoch"] == ckpt_one["epoch"] == 2
    start = torch.jit.load(str(world["tiny"])).state_dict()
    for name, value in ckpt_one["model"].items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        torch.testing.assert_close(ckpt_two["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in ckpt_one["discriminator"].items():
        torch.testing.assert_close(ckpt_two["discriminator"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    accum_replicas = [torch.load(accum / f"replica{r}.pt", weights_only=False) for r in range(2)]
    assert_same_tensors(accum_replicas[0], accum_replicas[1], "accumulating replicas")
    for name, value in ckpt_one["model"].items():
        torch.testing.assert_close(accum_replicas[0]["model"][name], value, rtol=1e-5, atol=1e-6, msg=f"accumulated {name}")
    for name, value in ckpt_one["discriminator"].items():
        torch.testing.assert_close(accum_replicas[0]["disc"][name], value, rtol=1e-5, atol=1e-6, msg=f"accumulated {name}")
    for name, value in ckpt_one["model"].items():
        torch.testing.assert_close(ckpt_moved["model"][name], value, rtol=1e-5, atol=1e-6, msg=f"moved {name}")
    for name, value in ckpt_one["discriminator"].items():
        torch.testing.assert_close(ckpt_moved["discriminator"][name], value, rtol=1e-5, atol=1e-6, msg=f"moved {name}")
    assert ckpt_moved["scheduler"]["last_epoch"] == ckpt_one["scheduler"]["last_epoch"] == 6
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two, moved)]
    assert [r["epoch"] for r in logs[1]] == [r["epoch"] for r in logs[2]] == [1, 2]
    for r1, r2, r3 in zip(*logs):
        for key in ("loss", "d_loss", "teacher_agreement"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), (key, r1, r2)
            assert r3[key] == pytest.approx(r1[key], rel=1e-5), (key, r1, r3)  # epoch 1's sums: both ranks' share, then this process's
        # --val sharded over the two ranks (5 + 4 of the 9 images, counts summed): the same accuracy
        assert (r2["val_top1"], r2["val_top5"]) == (r1["val_top1"], r1["val_top5"]), (r1, r2)


# ---------------------------------------------------------------------------------------------
# 7: user errors: one line, exit 2, no traceback, names the culprit and the fix
# ---------------------------------------------------------------------------------------------
def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """The real entry point (cli.main, as the console script runs it), in-process."""
    from mealkd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    return exit_.value.code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def broken(world):
    """An incomplete copy of the store, and a copy of the tree with a file added after precompute."""
    import zarr

    incomplete = world["root"] / "incomplete.zarr"
    shutil.copytree(world["store"], incomplete)
    zarr.open_group(str(incomplete), mode="r+")["done"][8:16] = False
    grown = world["root"] / "grown"
    shutil.copytree(world["tree"], grown)
    shutil.copy(grown / "class_0" / "img_000.jpg", grown / "class_0" / "img_new.jpg")
    five = world["root"] / "five_classes.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=5).state_dict(), five)
    return {"incomplete": incomplete, "grown": grown, "five": five}


@pytest.mark.parametrize(
    "case",
    ["incomplete", "fingerprint", "head", "missing-init-file", "missing-student-file", "bad-student-spec", "unknown-arch", "no-init",
     "existing-run", "val-classes", "negative-momentum", "batch-of-one", "out-is-a-file"],
)
def test_distill_user_errors(world, broken, straight_run, tmp_path, case, capsys):
    out = tmp_path / "run"
    args = distill_args(world, out, epochs=1)
    flag = {name: i + 1 for i, name in enumerate(args) if name.startswith("--")}
    needles: tuple[str, ...]
    if case == "incomplete":
        args[flag["--labels"]] = str(broken["incomplete"])
        needles = (str(broken["incomplete"]), "incomplete", "17/25", "rerun `mealkd precompute`")
    elif case == "fingerprint":
        args[flag["--data"]] = str(broken["grown"])
        needles = ("fingerprint", "files added, removed or changed", "rerun `mealkd precompute`")
    elif case == "head":
        args[flag["--init"]] = str(broken["five"])
        needles = (str(broken["five"]), "classifier.3.weight", "the store has 3 classes; the checkpoint head has 5", "init=pretrained")
    elif case == "missing-init-file":
        args[flag["--init"]] = str(tmp_path / "nope.pth")
        needles = ("init file", str(tmp_path / "nope.pth"), "does not exist")
    elif case == "missing-student-file":  # a TorchScript student is its file: named with its flag while parsing
        args[flag["--student"]] = str(tmp_path / "moved.pt")
        needles = ("--student", str(tmp_path / "moved.pt"), "does not exist")
    elif case == "bad-student-spec":
        args[flag["--student"]] = "torchvision:resnet18:size=x"
        needles = ("--student", "bad model spec", "size=")
    elif case == "unknown-arch":
        args[flag["--student"]] = "torchvision:resnet9000"
        needles = ("unknown torchvision architecture 'resnet9000'",)
    elif case == "no-init":
        i = args.index("--init")
        del args[i : i + 2]
        needles = ("--init is required", "scratch")
    elif case == "negative-momentum":  # was torch's ValueError traceback
        args += ["--momentum", "-1"]
        needles = ("--momentum -1.0", "[0, 1)")
    elif case == "batch-of-one":  # was a BatchNorm traceback once training had started
        args[flag["--batch-size"]] = "1"
        needles = ("--batch-size 1", "BatchNorm", "--batch-size 2 or more")
    elif case == "out-is-a-file":  # was a FileExistsError traceback
        args[flag["--out"]] = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("not a run")
        needles = ("--out", "is a file")
    elif case == "val-classes":  # found before the first epoch trains, not after it (an ImageNet epoch is hours)
        args += ["--val", str(make_jpeg_tree(tmp_path / "val4", classes=4, per_class=1))]
        needles = ("--val", "validation class 'class_3'")
    else:
        args[flag["--out"]] = str(straight_run.result())
        needles = (str(straight_run.out), "holds a checkpoint already", "--resume")
    code, err = run_main(args, capsys)
    assert_one_line_error(code, err, *needles)
    assert "epoch 1" not in err, err
    assert not (out / "checkpoint.pt").exists()
    if case == "out-is-a-file":
        assert (tmp_path / "a-file").read_text() == "not a run"


def test_user_error_exit_path_in_a_subprocess(world, broken):
    """The same refusal through `python cli.py` itself: exit status 2 and a single stderr line."""
    args = distill_args(world, world["root"] / "never", epochs=1)
    args[args.index("--labels") + 1] = str(broken["incomplete"])
    done = cli_run(args)
    assert_one_line_error(done.returncode, done.stderr, "incomplete")


# ---------------------------------------------------------------------------------------------
# 8: plot
# ---------------------------------------------------------------------------------------------
def test_plot_writes_png(straight_run, tmp_path, capsys):
    from mealkd import cli
    run = straight_run.result()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plot", str(run), "--out", str(tmp_path / "curves.png")])
    assert exit_.value.code == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    code, err = run_main(["plot", str(tmp_path / "not-a-run")], capsys)
    assert_one_line_error(code, err, "not-a-run: no such directory", "--out directory of a distill run")  # it said 'no metrics.jsonl there'
    (tmp_path / "empty").mkdir()
    code, err = run_main(["plot", str(tmp_path / "empty")], capsys)
    assert_one_line_error(code, err, "no metrics.jsonl", "--out directory of a distill run")
    # a log torn by a kill or a full disk mid-append is plotted without its torn line (was a JSON traceback)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"epoch": 9, "lo')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plot", str(torn)])
    assert exit_.value.code == 0 and (torn / "curves.png").is_file()
    (torn / "metrics.jsonl").write_text("")  # the run's first epoch has not ended
    code, err = run_main(["plot", str(torn)], capsys)
    assert_one_line_error(code, err, "no finished epoch yet")
    # an --out matplotlib cannot write, or in a missing directory: one line each (were tracebacks), nothing written
    code, err = run_main(["plot", str(run), "--out", str(tmp_path / "curves.foo")], capsys)
    assert_one_line_error(code, err, "curves.foo", "'.foo'", ".png")
    code, err = run_main(["plot", str(run), "--out", str(tmp_path / "nodir" / "curves.png")], capsys)
    assert_one_line_error(code, err, "nodir", "does not exist")
    # evaluate's sizes are checked too (--batch-size 0 was DALI's traceback; --image-size 0 was ignored)
    for flag, value, needle in (("--batch-size", "0", ">= 1"), ("--image-size", "0", "from 1 to 4096"), ("--image-size", "100000", "from 1 to 4096")):
        code, err = run_main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(run / "checkpoint.pt"), flag, value], capsys)
        assert_one_line_error(code, err, f"{flag} {value}", needle)
    # distill's --image-size and a model spec's :size= have precompute's bound too
    code, err = run_main(distill_args_for_bounds(run, "--image-size", "100000"), capsys)
    assert_one_line_error(code, err, "--image-size 100000", "from 1 to 4096")
    code, err = run_main(distill_args_for_bounds(run, "--student", "torchvision:resnet18:size=100000"), capsys)
    assert_one_line_error(code, err, "--student", "size= needs a number of pixels from 1 to 4096")


def distill_args_for_bounds(run: Path, flag: str, value: str) -> list[str]:
    """A distill command of the straight run's store and data with one flag replaced (``run``: its run directory)."""
    config = json.loads((run / "config.json").read_text())["config"]
    args = ["distill", "--labels", config["labels"], "--data", config["data"], "--student", config["student"], "--init", "scratch",
            "--out", str(run.parent / "bounds"), "--device", "cpu"]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args
