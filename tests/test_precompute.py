"""Stage one end to end: correctness of the stored labels, determinism (rerun, torchrun), kill + resume.

Real DALI, real Zarr on disk, real torch. One small dataset (24 JPEGs, 24-48 px) and three tiny
teachers with unequal weights, two input normalisations and a temperature != 1; a reference store
is made once per module and every other run is compared with it.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mealkd import storage
from mealkd.core.dali_io import Backend, build_pipeline, run_batches, to_torch
from mealkd.core.dataset import scan_image_folder
from mealkd.core.replay import FILES, Normalization, replay_graph
from mealkd.core.windows import CropPolicy, draw_all_windows
from mealkd.precompute.runner import PrecomputeConfig, run_precompute
from tests.datagen import make_jpeg_tree

REPO = Path(__file__).resolve().parents[1]
CPU = Backend(torch.device("cpu"))
TEMPERATURE = 2.5
WEIGHTS = (1.0, 0.3, 2.0)
CROPS = 3
IMAGE_SIZE = 32
IMAGES_PER_SHARD = 5  # 24 images -> 5 shards, the last one partial
N_IMAGES = 24
ARRAYS = ("paths", "targets", "sizes", "excluded", "windows", "flips", "probs", "done")


class TinyCNN(torch.nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3))) * 8.0


def make_teachers(root: Path, classes: int = 3) -> dict[str, Path]:
    """resnet18 / mobilenet_v3_small state dicts and a TorchScript CNN, all with ``classes`` outputs.

    Classifier weights are scaled up so the teachers are confident and disagree: then a wrong
    temperature, weight or crop shows in the averaged probabilities."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(classes)
    resnet = torchvision.models.resnet18(num_classes=classes)
    resnet.fc.weight.data *= 40
    mobile = torchvision.models.mobilenet_v3_small(num_classes=classes)
    mobile.classifier[3].weight.data *= 20
    paths = {"resnet": root / f"resnet18_{classes}.pth", "mobile": root / f"mnv3s_{classes}.pth", "script": root / f"tiny_{classes}.pt"}
    torch.save(resnet.state_dict(), paths["resnet"])
    torch.save(mobile.state_dict(), paths["mobile"])
    torch.jit.script(TinyCNN(classes)).save(str(paths["script"]))
    return paths


def teacher_arg(t: dict[str, Path]) -> str:
    return (
        f"torchvision:resnet18@{t['resnet']}:w={WEIGHTS[0]},"
        f"torchvision:mobilenet_v3_small@{t['mobile']}:w={WEIGHTS[1]},"
        f"{t['script']}:size=24:mean=0.5/0.5/0.5:std=0.25/0.25/0.25:w={WEIGHTS[2]}"
    )


def cli_args(data: Path, teachers: str, out: Path, **extra) -> list[str]:
    args = {
        "--data": data, "--teachers": teachers, "--out": out, "--crops-per-image": CROPS, "--image-size": IMAGE_SIZE,
        "--batch-size": 8, "--temperature": TEMPERATURE, "--images-per-shard": IMAGES_PER_SHARD, "--seed": 17, "--device": "cpu",
    }
    args.update(extra)
    return [x for k, v in args.items() for x in (k, str(v))]


def config(data: Path, teachers: str, out: Path) -> PrecomputeConfig:
    return PrecomputeConfig(
        data=str(data), teachers=teachers, out=str(out), crops_per_image=CROPS, image_size=IMAGE_SIZE, batch_size=8,
        temperature=TEMPERATURE, images_per_shard=IMAGES_PER_SHARD, seed=17, device="cpu",
    )


def read_arrays(url: Path) -> dict[str, np.ndarray]:
    store = storage.open_store(str(url), require_complete=False)
    return {name: np.asarray(store._group[name][:]) for name in ARRAYS}


def assert_same_store(url: Path, ref: Path) -> None:
    a, b = read_arrays(url), read_arrays(ref)
    for name in ARRAYS:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs from the reference store"
    attrs_a = storage.open_store(str(url), require_complete=False).attrs
    attrs_b = storage.open_store(str(ref), require_complete=False).attrs
    for key in ("class_names", "crop", "teachers", "temperature", "dataset", "decoder", "label_encoding", "crops_per_image", "num_classes", "images_per_shard"):
        assert attrs_a[key] == attrs_b[key], key
    assert "completed" in attrs_a


def run_cli(args: list[str], *, timeout: float = 240, env_extra: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    cmd = [sys.executable, *(launcher or []), str(REPO / "cli.py"), "precompute", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    data = make_jpeg_tree(root / "data", classes=3, per_class=8, seed=21, min_side=24, max_side=48)
    teachers = make_teachers(root / "teachers")
    ref = root / "ref.zarr"
    summary = run_precompute(config(data, teacher_arg(teachers), ref))
    assert summary["complete"] and summary["images"] == N_IMAGES and summary["crops"] == N_IMAGES * CROPS
    return {"root": root, "data": data, "teachers": teachers, "spec": teacher_arg(teachers), "ref": ref}


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------
_PIPES: dict = {}


def replay_slot(index, windows, flips, norm: Normalization, slot: int) -> torch.Tensor:
    """Stage two's replay pipeline (image_slice) for crop ``slot`` of every image -> (N, 3, S, S)."""
    if norm not in _PIPES:
        _PIPES[norm] = build_pipeline(replay_graph(norm, CPU.decoder, 1), batch_size=5, backend=CPU, num_threads=2)
    pipe = _PIPES[norm]
    ids = np.arange(len(index))

    def feeds():
        for s in range(0, len(ids), 5):
            b = ids[s : s + 5]
            yield {
                FILES: index.file_feed(b.tolist()),
                "labels": [np.zeros((1, 3), np.float32) for _ in b],
                "anchor0": [np.ascontiguousarray(w[:2]) for w in windows[b, slot]],
                "shape0": [np.ascontiguousarray(w[2:]) for w in windows[b, slot]],
                "flip0": [np.array(f, dtype=np.int32) for f in flips[b, slot]],
            }

    return torch.cat(list(run_batches(pipe, feeds(), lambda o: to_torch(o[0], CPU.device))))


def pil_slot(index, windows, flips, norm: Normalization, slot: int) -> torch.Tensor:
    out = []
    for i in range(len(index)):
        y, x, h, w = windows[i, slot].tolist()
        img = Image.open(index.root / index.paths[i]).convert("RGB").crop((x, y, x + w, y + h)).resize((norm.size, norm.size), Image.BILINEAR)
        a = np.asarray(img, np.float32) / 255.0
        if flips[i, slot]:
            a = a[:, ::-1]
        a = (a - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))))
    return torch.stack(out)


def plain_teachers(t: dict[str, Path]):
    """The teachers rebuilt with plain torchvision / torch.jit, independently of core.models."""
    resnet = torchvision.models.resnet18(num_classes=3)
    resnet.load_state_dict(torch.load(t["resnet"], weights_only=True))
    mobile = torchvision.models.mobilenet_v3_small(num_classes=3)
    mobile.load_state_dict(torch.load(t["mobile"], weights_only=True))
    script = torch.jit.load(str(t["script"]))
    imagenet = Normalization(IMAGE_SIZE)
    tiny = Normalization(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return [(resnet.eval(), imagenet), (mobile.eval(), imagenet), (script.eval(), tiny)]


@torch.inference_mode()
def ensemble_probs(teachers, pixels: dict[Normalization, torch.Tensor], weights, temperature) -> np.ndarray:
    total = sum(weights)
    avg = sum(torch.softmax(m(pixels[norm]) / temperature, dim=1) * (w / total) for (m, norm), w in zip(teachers, weights))
    return avg.numpy()


def test_stored_probs_equal_independent_computation(env):
    """Store = weighted mean of softmax(logits / T) of each teacher on the stored crop, to fp16 precision.

    Pixels come from stage two's replay pipeline (bit-exact with stage one, tests/test_replay.py);
    the teachers run in plain torch. Tolerance: fp16 rounding of values in [0, 1] is <= 2^-11
    relative (2^-25 absolute below 2^-14), plus float32 noise from different batch compositions
    (~1e-6): rtol = 2^-10, atol = 1e-6. Controls show that T = 1, equal weights, or the unflipped
    crop each miss by far more than that.
    """
    store = storage.open_store(str(env["ref"]))
    index = scan_image_folder(env["data"])
    assert store.paths == index.paths and store.class_names == index.class_names
    assert store.attrs["temperature"] == TEMPERATURE
    assert [t["weight"] for t in store.attrs["teachers"]] == list(WEIGHTS)
    assert [t["input_size"] for t in store.attrs["teachers"]] == [None, None, 24]
    assert store.done.all() and not store.excluded.any()
    # sizes: decoded (H, W); windows/flips: the seeded RandomResizedCrop draws for those sizes
    assert store.sizes.tolist() == [list(Image.open(index.root / p).size[::-1]) for p in index.paths]
    policy = CropPolicy(IMAGE_SIZE, seed=17)
    windows, flips = draw_all_windows(policy, np.arange(len(index)), store.sizes, CROPS)
    assert np.array_equal(store.windows, windows) and np.array_equal(store.flips, flips)
    assert flips.any() and not flips.all()

    teachers = plain_teachers(env["teachers"])
    norms = {norm for _, norm in teachers}
    stored = np.asarray(store._group["probs"][:], np.float16)
    assert stored.shape == (N_IMAGES, CROPS, 3)
    worst = {"exact": 0.0, "T=1": 0.0, "equal weights": 0.0, "no flip": 0.0, "pil": 0.0}
    for slot in range(CROPS):
        pixels = {norm: replay_slot(index, windows, flips, norm, slot) for norm in norms}
        ref = ensemble_probs(teachers, pixels, WEIGHTS, TEMPERATURE)
        got = stored[:, slot].astype(np.float32)
        np.testing.assert_allclose(got, ref, rtol=2**-10, atol=1e-6, err_msg=f"slot {slot}")
        assert np.abs(got.sum(-1) - 1).max() < 3e-3
        worst["exact"] = max(worst["exact"], float(np.abs(got - ref).max()))
        worst["T=1"] = max(worst["T=1"], float(np.abs(got - ensemble_probs(teachers, pixels, WEIGHTS, 1.0)).max()))
        worst["equal weights"] = max(worst["equal weights"], float(np.abs(got - ensemble_probs(teachers, pixels, (1, 1, 1), TEMPERATURE)).max()))
        unflipped = {norm: replay_slot(index, windows, np.zeros_like(flips), norm, slot) for norm in norms}
        worst["no flip"] = max(worst["no flip"], float(np.abs(got - ensemble_probs(teachers, unflipped, WEIGHTS, TEMPERATURE)).max()))
        # PIL pixels (another JPEG decoder and resampler): close, not exact
        pil = {norm: pil_slot(index, windows, flips, norm, slot) for norm in norms}
        worst["pil"] = max(worst["pil"], float(np.abs(got - ensemble_probs(teachers, pil, WEIGHTS, TEMPERATURE)).max()))
    assert worst["exact"] <= 2**-10
    for control in ("T=1", "equal weights", "no flip"):
        assert worst[control] > 0.02, (control, worst)
    assert worst["pil"] < 0.05, worst


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------
def test_second_run_identical(env, tmp_path):
    out = tmp_path / "again.zarr"
    summary = run_precompute(config(env["data"], env["spec"], out))
    assert summary["complete"] and summary["shards_written"] == 5
    assert_same_store(out, env["ref"])
    # where the labelling thread's time went (a CPU run has no GPU wait), all inside the loop's wall time
    spent = summary["thread_s"]
    assert set(spent) == {"crops", "teachers", "writes"} and min(spent.values()) >= 0 and spent["teachers"] > 0, spent
    assert sum(spent.values()) <= summary["labelling_s"] + 1e-3, (spent, summary["labelling_s"])
    # rerunning a complete store is a no-op that leaves it identical
    summary = run_precompute(config(env["data"], env["spec"], out))
    assert summary["shards_written"] == 0 and summary["complete"]
    assert_same_store(out, env["ref"])


def test_torchrun_two_processes_identical_to_one(env, tmp_path):
    out = tmp_path / "ddp.zarr"
    proc = run_cli(
        cli_args(env["data"], env["spec"], out),
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "complete" in proc.stderr
    # the job's totals (both ranks' crops), and rank 0's time report
    assert "24 images, 72 crops labelled by this run" in proc.stderr, proc.stderr[-1000:]
    assert "crops/s by 2 processes over" in proc.stderr and "rank 0's labelling thread waited" in proc.stderr, proc.stderr[-1000:]
    assert_same_store(out, env["ref"])


# ----------------------------------------------------------------------------------------------
# kill -9 and resume
# ----------------------------------------------------------------------------------------------
def done_chunks(url: Path) -> int:
    """Cheap progress poll: chunk files of the ``done`` array (one per shard once it is marked)."""
    folder = url / "done" / "c"  # zarr writes '<key>.<uuid>.partial' first and renames it: count only finished files
    return len([p for p in folder.iterdir() if not p.name.endswith(".partial")]) if folder.is_dir() else 0


def check_done_rows_final(url: Path, ref: dict[str, np.ndarray]) -> int:
    """Every image marked done already holds exactly the reference windows, flips and labels."""
    if not storage.store_exists(str(url)):
        return 0
    got = read_arrays(url)
    done = got["done"]
    for name in ("windows", "flips", "probs"):
        assert np.array_equal(got[name][done], ref[name][done]), f"{name} of a done image differs from the reference"
    for name in ("paths", "targets", "sizes", "excluded"):
        assert np.array_equal(got[name], ref[name]), name
    return int(done.sum())


def start_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), "precompute", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)


def test_sigkill_then_rerun_matches_uninterrupted_run(env, tmp_path):
    """SIGKILL (1) at a random moment just after the run locked the store (validation, store
    creation or a shard), (2) on resume, right after its first shard is marked done; after each kill
    every done image already holds its final labels, in whole shards; (3) a rerun completes the store
    identical to the uninterrupted reference, labelling only what was not done. A kill that lands
    after the run's last shard (the whole run takes under a second here) must leave it the same."""
    out = tmp_path / "killed.zarr"
    lock = out.with_name(out.name + ".lock")
    ref = read_arrays(env["ref"])
    args = cli_args(env["data"], env["spec"], out)
    delay = random.Random().uniform(0.0, 0.3)
    log = [f"delay {delay:.3f}s after lock"]

    proc = start_cli(args)
    try:
        wait_for(proc, lambda: lock.exists() and lock.read_text().strip() != "")
        time.sleep(delay)
    finally:
        rc = kill(proc)
    first = check_done_rows_final(out, ref)
    log.append(f"kill 1: rc {rc}, {first} done")
    assert rc in (-signal.SIGKILL, 0), (log, proc.stderr.read()[-2000:])
    assert first % IMAGES_PER_SHARD == 0 or first == N_IMAGES, log  # whole shards only

    second = first
    if first < N_IMAGES:
        proc = start_cli(args)
        try:
            wait_for(proc, lambda: done_chunks(out) > first // IMAGES_PER_SHARD)
        finally:
            rc = kill(proc)
        second = check_done_rows_final(out, ref)
        log.append(f"kill 2: rc {rc}, {second} done")
        # one pending shard (first = 20) may be done before the kill lands
        assert rc in (-signal.SIGKILL, 0) and first < second <= N_IMAGES, (log, proc.stderr.read()[-2000:])
        assert second % IMAGES_PER_SHARD == 0 or second == N_IMAGES, log

    proc = run_cli(args)
    assert proc.returncode == 0, (log, proc.stderr[-3000:])
    assert f"precompute: {N_IMAGES - second} images" in proc.stderr, (log, proc.stderr[-500:])  # only the missing shards were labelled
    assert_same_store(out, env["ref"])


def test_compiled_teachers_label_like_eager_ones(env, tmp_path):
    """--compile runs every teacher through torch.compile and labels what eager teachers label, with one
    static graph per teacher and batch shape (8 and 7 crops of a 5-image shard, 4 of the last shard's 4
    images). The backend here records each graph Dynamo captured and runs it as captured."""
    from torch._dynamo import register_backend

    captured: list[tuple[int, ...]] = []

    def recording(graph, example_inputs):
        crops = [x for x in example_inputs if isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == (3, IMAGE_SIZE, IMAGE_SIZE)]
        captured.append(tuple(x.shape[0] for x in crops))
        return graph.forward

    register_backend(recording, name="mealkd_test_recording")
    spec = ",".join(env["spec"].split(",")[:2])  # the torchvision teachers (a TorchScript file cannot be compiled)
    eager, comp = tmp_path / "eager.zarr", tmp_path / "compiled.zarr"
    run_precompute(config(env["data"], spec, eager))
    cfg = config(env["data"], spec, comp)
    cfg.compile, cfg.compile_backend = True, "mealkd_test_recording"
    summary = run_precompute(cfg)
    assert sorted(captured) == sorted([(8,), (7,), (4,)] * 2), captured  # 2 teachers x 3 shapes, no shape-generic graph
    assert summary["complete"] and summary["crops"] == N_IMAGES * CROPS
    a, b = read_arrays(comp), read_arrays(eager)
    for name in ARRAYS:
        if name != "probs":
            assert np.array_equal(a[name], b[name]), name
    pa, pb = a["probs"].astype(np.float32), b["probs"].astype(np.float32)
    assert np.abs(pa - pb).max() <= 1e-3  # float rounding at most (stored as fp16)
    assert np.array_equal(pa.argmax(-1), pb.argmax(-1))
