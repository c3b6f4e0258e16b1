"""`mealkd verify STORE [--data --teachers --sample N] [--repair]`: integrity checks, the recomputation
check, exit codes (0 pass, 1 failed check, 2 user error), and repair + precompute rerun restoring a
damaged store to the uninterrupted result."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from mealkd import storage
from mealkd.errors import UserError
from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import assert_same_store, assert_user_error, precompute_args, run, tiny_teacher, tiny_world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from mealkd import cli
    root = tmp_path_factory.mktemp("verify")
    data, teachers = tiny_world(root, seed=11)
    for name, extra in (("dense.zarr", ()), ("topk.zarr", ("--encoding", "topk:2"))):
        with pytest.raises(SystemExit) as exc:
            cli.main(precompute_args(data, teachers, root / name, *extra))
        assert exc.value.code == 0
    return root, data, teachers


def fresh(made, tmp_path, name="dense.zarr") -> Path:
    return Path(shutil.copytree(made[0] / name, tmp_path / name))


def rows(proc) -> dict[str, str]:
    """check name -> PASS/FAIL/skip from the rich table."""
    out = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 2 and cells[1] in ("PASS", "FAIL", "skip") and cells[0]:
            out[cells[0]] = cells[1]
    return out


@pytest.mark.parametrize("name", ["dense.zarr", "topk.zarr"])
def test_clean_store_passes_integrity_and_recomputation(made, capsys, name):
    root, data, teachers = made
    proc = run(capsys, "verify", str(root / name), "--data", str(data), "--teachers", teachers, "--sample", "27", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = rows(proc)
    assert set(got.values()) == {"PASS"} and {"chunk files", "probability rows", "windows in bounds", "complete", "recompute vs stored"} <= set(got)
    assert "top-1 agreement 100.0%" in proc.stdout.replace("\n", "")


@pytest.mark.parametrize("damage", ["deleted labels", "truncated labels", "torn windows of a top-k store"])
def test_damaged_shard_fails_and_repair_plus_rerun_restores_it(made, tmp_path, capsys, damage):
    """The documented recovery: verify finds the shard, --repair marks it not done (and the store no longer
    complete), a precompute rerun rewrites it. A truncated or torn file used to fail every rewrite with a
    zarr checksum traceback (the sharding codec read the old file's index)."""
    root, data, teachers = made
    name = "topk.zarr" if "top-k" in damage else "dense.zarr"
    store = fresh(made, tmp_path, name)
    array = "windows" if "windows" in damage else ("topk_val" if "top-k" in damage else "probs")
    target = next(p for p in sorted((store / array / "c" / "2").rglob("*")) if p.is_file())
    if damage.startswith("deleted"):
        target.unlink()
    else:
        content = target.read_bytes()
        target.write_bytes(content[: 20 if "torn" in damage else len(content) // 2])
    proc = run(capsys, "verify", str(store))
    assert proc.returncode == 1 and "damaged shards: 2" in proc.stdout, proc.stdout
    proc = run(capsys, "verify", str(store), "--repair")
    assert proc.returncode == 1 and "marked not done" in proc.stdout
    assert "completed" not in zarr.open_group(str(store), mode="r").attrs  # the store no longer claims it
    proc = run(capsys, "verify", str(store))
    assert proc.returncode == 1 and rows(proc)["complete"] == "FAIL"
    extra = ("--encoding", "topk:2") if "top-k" in damage else ()
    done = run(capsys, *precompute_args(data, teachers, store, *extra))
    assert done.returncode == 0, done.stderr
    assert run(capsys, "verify", str(store)).returncode == 0
    assert_same_store(store, root / name)


def test_repair_drops_a_completed_record_that_no_longer_holds(made, tmp_path, capsys):
    """A repair killed between its done writes and dropping 'completed' (the order before it was reversed)
    left an incomplete store recorded as completed, and a rerun of --repair found nothing damaged to repair."""
    store = fresh(made, tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    done = np.asarray(group["done"][:])
    done[:3] = False
    group["done"][:] = done
    assert "completed" in group.attrs
    proc = run(capsys, "verify", str(store), "--repair")
    assert proc.returncode == 1 and "'completed' record dropped" in proc.stdout, proc.stdout
    assert "completed" not in zarr.open_group(str(store), mode="r").attrs


@pytest.mark.parametrize("array", ["windows", "done", "flips"])
def test_zeroed_or_truncated_chunk_is_unreadable(made, tmp_path, capsys, array):
    store = fresh(made, tmp_path)
    target = next(p for p in sorted((store / array / "c").rglob("*")) if p.is_file())
    target.write_bytes(b"\0" * 3)
    proc = run(capsys, "verify", str(store))
    assert proc.returncode == 1
    assert rows(proc)["chunks readable"] == "FAIL", proc.stdout


@pytest.mark.parametrize("damage", ["targets unreadable", "paths unreadable", "flips missing", "probs missing"])
def test_damage_no_rerun_mends_is_named_and_repair_keeps_the_labels(made, tmp_path, capsys, damage):
    """The arrays written once at create time, or a whole array's metadata: a rerun never rewrites them.
    verify called every shard damaged and --repair marked the whole store not done (a full relabel that
    still left the store broken); inspect and distill's reader gave a RuntimeError / KeyError traceback."""
    store = fresh(made, tmp_path)
    array, how = damage.split()
    if how == "unreadable":
        for chunk in (p for p in (store / array / "c").rglob("*") if p.is_file()):
            chunk.write_bytes(b"\xff" * 7)
    else:
        shutil.rmtree(store / array)
    done_before = np.asarray(zarr.open_group(str(store), mode="r")["done"][:]) if array != "done" else None
    detail = f"array '{array}'" if how == "missing" else f"{array} unreadable"
    for argv in (("verify", str(store)), ("verify", str(store), "--repair")):
        proc = run(capsys, *argv)
        text = (proc.stdout + proc.stderr).replace("\n", "")
        assert proc.returncode in (1, 2) and "damaged beyond repair" in text and detail in text, text
        assert "--repair and rerun" not in text and "marked not done" not in text, text
    assert np.array_equal(np.asarray(zarr.open_group(str(store), mode="r")["done"][:]), done_before)  # no label thrown away
    assert "completed" in zarr.open_group(str(store), mode="r").attrs
    proc = run(capsys, "inspect", str(store))  # a reader of the store: one line, not a traceback
    assert proc.returncode == 0 or (proc.returncode == 2 and "damaged beyond repair" in proc.stderr
                                    and len(proc.stderr.strip().splitlines()) == 1), proc.stderr
    with pytest.raises(UserError, match="damaged beyond repair"):  # what distill reads of it
        reader = storage.open_store(str(store))
        reader.paths, reader.targets, reader.slot_crops(0, np.arange(2)), reader.slot_labels(0, np.arange(2))


def test_rows_that_are_not_probabilities_fail(made, tmp_path, capsys):
    store = fresh(made, tmp_path)
    probs = zarr.open_group(str(store), mode="r+")["probs"]
    block = np.asarray(probs[0:2]).astype(np.float32)
    block[1, 2] *= 0.5  # one row now sums to < 1
    probs[0:2] = block.astype(np.float16)
    proc = run(capsys, "verify", str(store))
    assert proc.returncode == 1 and rows(proc)["probability rows"] == "FAIL"
    assert "image 1 crop 2" in proc.stdout.replace("\n", "")


def test_window_outside_the_image_fails(made, tmp_path, capsys):
    store = fresh(made, tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    win = np.asarray(group["windows"][2:4])
    win[0, 1, 0] = int(group["sizes"][2][0])  # y = image height: the window hangs off the bottom
    group["windows"][2:4] = win
    proc = run(capsys, "verify", str(store))
    assert proc.returncode == 1 and rows(proc)["windows in bounds"] == "FAIL"


def test_recomputation_catches_labels_that_are_valid_but_wrong(made, tmp_path, capsys):
    """Rows still sum to 1, so integrity passes; recomputing through the teachers does not."""
    root, data, teachers = made
    store = fresh(made, tmp_path)
    probs = zarr.open_group(str(store), mode="r+")["probs"]
    block = np.asarray(probs[4:6])
    probs[4:6] = block[..., ::-1].copy()  # classes reversed
    assert run(capsys, "verify", str(store)).returncode == 0
    proc = run(capsys, "verify", str(store), "--data", str(data), "--teachers", teachers, "--sample", "27", "--device", "cpu")
    assert proc.returncode == 1 and rows(proc)["recompute vs stored"] == "FAIL"
    assert "damaged shards: 2" in proc.stdout


def test_user_errors(made, tmp_path, capsys):
    root, data, teachers = made
    assert_user_error(run(capsys, "verify", str(tmp_path / "nothing.zarr")), "not a mealkd label store")
    assert_user_error(run(capsys, "verify", str(root / "dense.zarr"), "--data", str(data)), "--data and --teachers")
    other = tiny_teacher(tmp_path / "other.pt", seed=5)
    assert_user_error(run(capsys, "verify", str(root / "dense.zarr"), "--data", str(data), "--teachers", str(other)), "--teachers", "not the store's teachers")
    make_jpeg_tree(tmp_path / "other_data", classes=3, per_class=2, seed=1)
    assert_user_error(run(capsys, "verify", str(root / "dense.zarr"), "--data", str(tmp_path / "other_data"), "--teachers", teachers), "--data", "not the dataset", "fingerprint")
    assert_user_error(run(capsys, "verify", str(root / "dense.zarr"), "--sample", "0"), "--sample")
    # --tolerance nan passed every comparison (a store of wrong labels verified); --seed -1 was numpy's traceback
    for flag, value in (("--tolerance", "nan"), ("--tolerance", "inf"), ("--seed", "-1")):
        assert_user_error(run(capsys, "verify", str(root / "dense.zarr"), "--data", str(data), "--teachers", teachers, flag, value), flag)


def test_damage_and_incompleteness_name_the_command_that_wrote_the_store(made, tmp_path, capsys):
    """A damaged or incomplete extended store is rewritten by rerunning `mealkd extend`, not precompute
    (whose rerun on it is refused): verify --repair, the readers' damage line and inspect say so."""
    root, data, teachers = made
    out = tmp_path / "r4.zarr"
    assert run(capsys, "extend", str(root / "dense.zarr"), "--crops-per-image", "4", "--data", str(data), "--out", str(out)).returncode == 0
    next(p for p in sorted((out / "probs" / "c" / "1").rglob("*")) if p.is_file()).unlink()
    proc = run(capsys, "verify", str(out), "--repair")
    assert proc.returncode == 1 and "rerun `mealkd extend` with the same arguments" in proc.stdout.replace("\n", " "), proc.stdout
    assert "(rerun extend to finish)" in run(capsys, "inspect", str(out)).stdout.replace("\n", " ")
    proc = run(capsys, "distill", "--labels", str(out), "--data", str(data), "--student", "torchvision:mobilenet_v3_small", "--init", "scratch",
               "--out", str(tmp_path / "run"), "--device", "cpu")
    assert_user_error(proc, "incomplete", "rerun `mealkd extend`")
    assert run(capsys, "extend", str(root / "dense.zarr"), "--crops-per-image", "4", "--data", str(data), "--out", str(out)).returncode == 0
    assert run(capsys, "verify", str(out)).returncode == 0


class ClassZeroTeacher(torch.nn.Module):
    """Every crop's top class is class 0 (as every crop of a shard of class 0's images may well be)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[4.0, 1.0, 0.0]]).expand(x.shape[0], 3) + 0 * x.mean()


def test_a_top1_store_whose_top_class_is_class_0_is_complete_and_readable(made, tmp_path, capsys):
    """top-k:1 rows whose index is 0 everywhere make an all-zero index block, which zarr did not write (its
    fill value): the store was called complete, then refused as damaged by every reader, and --repair plus
    a rerun wrote it the same way again. Every block is written now; a store written before (no index file
    for such a shard) reads back as the zeros it held."""
    root, data, _ = made
    teacher = tmp_path / "zero.pt"
    torch.jit.script(ClassZeroTeacher()).save(str(teacher))
    out = tmp_path / "top1.zarr"
    assert run(capsys, *precompute_args(data, str(teacher), out, "--encoding", "topk:1")).returncode == 0
    assert run(capsys, "verify", str(out)).returncode == 0
    store = zarr.open_group(str(out), mode="r")
    assert store["topk_idx"].nchunks_initialized == store["topk_idx"].nchunks  # every shard's index file is there
    for path in sorted((out / "topk_idx" / "c").rglob("*")):  # a store written before: no index files
        if path.is_file():
            path.unlink()
    proc = run(capsys, "verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from mealkd import storage

    labels = storage.open_store(str(out))
    rows = labels.slot_labels(0)  # what distill reads: class 0 on top, as labelled
    assert rows.shape == (labels.num_images, 3) and (rows.argmax(1) == 0).all()
