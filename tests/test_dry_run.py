"""`precompute --dry-run`: a sample through the real stage-one path, extrapolated to the job; nothing
written. On a dataset small enough that the sample is every image, its label fidelity must equal the
store a real run then writes, and its size estimate must be close to that store's bytes."""
from __future__ import annotations

import pytest
import torch
import torchvision

from mealkd import storage
from mealkd.precompute.dry_run import CANDIDATE_K, run_dry_run, sample_ids
from mealkd.precompute.runner import PrecomputeConfig, run_precompute
from tests.datagen import make_jpeg_tree

CLASSES, PER_CLASS, R, SIZE = 12, 4, 3, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dry_run")
    tree = make_jpeg_tree(root / "train", CLASSES, PER_CLASS, seed=0)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), root / "r18.pth")
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=CLASSES).state_dict(), root / "mnv3.pth")
    teachers = f"torchvision:resnet18@{root / 'r18.pth'},torchvision:mobilenet_v3_small@{root / 'mnv3.pth'}:w=0.5"
    return {"root": root, "tree": tree, "teachers": teachers}


def config(world, out, **kw) -> PrecomputeConfig:
    settings = dict(data=str(world["tree"]), teachers=world["teachers"], out=str(out), crops_per_image=R, image_size=SIZE,
                    batch_size=8, device="cpu", num_threads=1, temperature=4.0)
    return PrecomputeConfig(**(settings | kw))


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    from mealkd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_sample_spreads_over_the_dataset():
    ids = sample_ids(1_281_167, 100, 256)
    assert 60 <= len(ids) <= 70 and ids[0] == 0 and ids[-1] == 1_281_166  # 27 batches of 256 crops at R = 100
    assert (sample_ids(10, 3, 64) == range(10)).all()  # a small dataset: every image


def test_dry_run_predicts_what_the_real_run_writes(world, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    code, err = run_main(["precompute", "--data", str(world["tree"]), "--teachers", world["teachers"], "--out", str(out), "--crops-per-image", str(R),
                          "--image-size", str(SIZE), "--batch-size", "8", "--device", "cpu", "--num-threads", "1", "--temperature", "4",
                          "--encoding", "topk:5", "--dry-run"], capsys)
    assert code == 0, err
    assert not out.exists()  # nothing written at --out
    assert "dry run: nothing was written" in err and f"{CLASSES * PER_CLASS} of {CLASSES * PER_CLASS} images x {R} crops" in err
    assert "topk:5:" in err and "<- --encoding" in err

    predicted = run_dry_run(config(world, out, encoding="topk:5"))
    assert predicted["sample_images"] == CLASSES * PER_CLASS  # every image: the prediction covers the very crops the run labels
    fits = {f["encoding"]: f for f in predicted["fits"]}
    assert set(fits) == {"dense", *(f"topk:{k}" for k in CANDIDATE_K if k < CLASSES)}
    assert fits["dense"]["mean_tv"] < 1e-3 < fits["topk:5"]["mean_tv"]  # fp16 rounding only vs real truncation at T = 4
    assert fits["topk:10"]["mean_tv"] < fits["topk:5"]["mean_tv"]
    assert predicted["crops_per_s"] > 0 and predicted["teacher_hours"] > 0

    run_precompute(config(world, out, encoding="topk:5"))
    store = storage.open_store(str(out))
    sum_tv, max_tv, rows = store.shard_fidelity().sum(0)[0], store.shard_fidelity()[:, 1].max(), store.shard_fidelity().sum(0)[2]
    assert rows == CLASSES * PER_CLASS * R
    assert fits["topk:5"]["mean_tv"] == pytest.approx(sum_tv / rows, rel=1e-6)  # the same rows, so the same fidelity
    assert fits["topk:5"]["max_tv"] == pytest.approx(max_tv, rel=1e-6)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert 0.7 * written <= predicted["store_bytes"] <= 1.3 * written, (predicted["store_bytes"], written)

    again = run_dry_run(config(world, out, encoding="topk:5"))  # a finished store: nothing left to label or write
    assert again["pending_images"] == 0 and again["crops"] == 0 and again["teacher_hours"] == 0 and "0 of 1 shards pending" in again["store"]


def test_dry_run_errors_are_one_line(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "store.zarr"
    run_precompute(config(world, out))
    capsys.readouterr()  # the real run's progress
    args = ["precompute", "--data", str(world["tree"]), "--teachers", world["teachers"], "--out", str(out), "--crops-per-image", str(R + 1),
            "--image-size", str(SIZE), "--device", "cpu", "--num-threads", "1", "--temperature", "4", "--dry-run"]
    code, err = run_main(args, capsys)  # another R than the store at --out: what the real rerun would refuse
    assert code == 2 and len(err.strip().splitlines()) == 1 and "other settings" in err and f"--crops-per-image {R + 1} (the store: {R}" in err, err
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    code, err = run_main(args, capsys)
    assert code == 2 and "--dry-run: measures one process; run it without torchrun" in err, err


def test_dry_run_measures_compiled_teachers(world, tmp_path):
    """--dry-run --compile labels the sample with compiled teachers (the last, smaller batch shape compiled
    before the clock starts) and finds the same label fidelity as the eager dry run."""
    teacher = world["teachers"].split(",")[0]
    eager = run_dry_run(config(world, tmp_path / "a.zarr", batch_size=10, teachers=teacher))
    compiled = run_dry_run(config(world, tmp_path / "b.zarr", batch_size=10, teachers=teacher, compile=True, compile_backend="aot_eager"))
    assert (CLASSES * PER_CLASS * R) % 10  # a partial last batch: a second shape to compile
    assert eager["compiled"] is None and compiled["compiled"] == "aot_eager" and compiled["crops_per_s"] > 0
    for a, b in zip(eager["fits"], compiled["fits"]):
        assert a["encoding"] == b["encoding"] and a["mean_tv"] == pytest.approx(b["mean_tv"], abs=1e-4)


def test_small_sample_unreadable_file_and_any_requested_k(tmp_path, capsys):
    """A sample of exactly WARMUP_BATCHES batches is timed whole (the clock used to restart after its last
    batch: 189,650 crops/s); the unreadable sampled file is not counted as sampled and the report says the
    run stops on it; the requested top-k is measured and marked for any K and spelling."""
    from mealkd.precompute.dry_run import WARMUP_BATCHES
    from tests.test_reliability_common import run, tiny_teacher

    tree = make_jpeg_tree(tmp_path / "train", classes=8, per_class=2, seed=1)
    (tree / "class_3" / "img_001.jpg").write_bytes(b"not an image")
    teacher = str(tiny_teacher(tmp_path / "t.pt", classes=8))
    cfg = PrecomputeConfig(data=str(tree), teachers=teacher, out=str(tmp_path / "s.zarr"), crops_per_image=2, image_size=SIZE,
                           batch_size=10, device="cpu", num_threads=1, encoding="topk:3")
    result = run_dry_run(cfg)  # 15 readable images x 2 crops = 3 batches of 10
    assert result["timed_batches"] == WARMUP_BATCHES and result["warmup_batches"] == 0
    # every batch is in the timed window, so it lasts at least the teachers' own seconds (rounded to 1 ms)
    assert 0 < result["crops_per_s"] <= 30 / max(result["thread_s"]["teachers"] - 1e-3, 1e-4), result
    assert result["sample_images"] == 15 and result["sample_unreadable"] == 1
    # 16 images in one shard (the inner chunk's 1024 images is the floor): one GPU of 8 or 64 labels them all
    assert result["busiest_share"] == {8: 1.0, 64: 1.0}
    argv = ["precompute", "--data", str(tree), "--teachers", teacher, "--out", str(tmp_path / "s.zarr"), "--crops-per-image", "2",
            "--image-size", str(SIZE), "--batch-size", "10", "--device", "cpu", "--num-threads", "1", "--dry-run"]
    for encoding, marked in (("topk:3", "topk:3:"), ("TOPK:5", "topk:5:")):
        proc = run(capsys, *argv, "--encoding", encoding)
        assert proc.returncode == 0, proc.stderr
        assert "every batch timed" in proc.stderr and "(15 images sampled, 1 more unreadable)" in proc.stderr
        assert "the run will stop on them" in proc.stderr and "--skip-bad" in proc.stderr
        assert "cannot be decoded (" in proc.stderr and "class_3/img_001.jpg" in proc.stderr  # named, as the README says
        chosen = [line for line in proc.stderr.splitlines() if "<- --encoding" in line]
        assert len(chosen) == 1 and chosen[0].strip().startswith(marked), proc.stderr
