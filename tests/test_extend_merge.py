"""`mealkd extend` and `mealkd merge` on real stores (real precompute runs, DALI on CPU, TorchScript
teachers), and `mealkd inspect --json` / the history they record.

* extend R=3 -> 5 equals, array by array and in its label attributes, a store made with 5 crops
  from the start (dense and topk:2);
* merging a store of teacher A and one of teacher B equals one precompute with both (dense, within
  fp16 rounding); top-k stores merge over the union of supports with the fidelity measured;
* SIGKILL during extend / merge, rerun: the same store as an uninterrupted run;
* every bad input: one line naming the flag or store, exit 2.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from mealkd.storage.encoding import decode_topk, normalise_rows
from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import (
    assert_user_error, cli, run, store_arrays, store_attrs, tiny_teacher,
)

CLASSES = 5
SEED = int(os.environ.get("MEALKD_KILL_SEED", np.random.SeedSequence().entropy % 10**6))
#: attributes that differ by nature between a derived store and a store made directly
HISTORY = ("extended_from", "merged_from", "fidelity_reference")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    data = make_jpeg_tree(root / "data", classes=CLASSES, per_class=2, seed=5, min_side=24, max_side=36)  # 10 images, 5 shards
    t1 = tiny_teacher(root / "t1.pt", classes=CLASSES, seed=1)
    t2 = tiny_teacher(root / "t2.pt", classes=CLASSES, seed=2)
    return {"root": root, "data": data, "t1": str(t1), "t2": f"{t2}:w=0.5", "both": f"{t1},{t2}:w=0.5"}


def _pre(capsys, w, teachers: str, name: str, crops: int = 3, *extra: str) -> Path:
    out = w["root"] / name
    if not out.exists():
        proc = run(capsys, "precompute", "--data", str(w["data"]), "--teachers", teachers, "--out", str(out),
                   "--crops-per-image", str(crops), "--image-size", "16", "--batch-size", "4", "--images-per-shard", "2",
                   "--device", "cpu", *extra)
        assert proc.returncode == 0, proc.stderr
    return out


def _extend_args(w, store: Path, out: Path, crops: int = 5, *extra: str) -> list[str]:
    return ["extend", str(store), "--crops-per-image", str(crops), "--out", str(out), "--data", str(w["data"]),
            "--batch-size", "4", *extra]


def _label_attrs(url: Path) -> dict:
    return {k: v for k, v in store_attrs(url).items() if k not in HISTORY}


def _assert_same_labels(got: Path, want: Path, *, exact_fidelity: bool = True) -> None:
    a, b = store_arrays(got), store_arrays(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), f"array {name} differs"
    ga, wa = _label_attrs(got), _label_attrs(want)
    if not exact_fidelity:  # a sum over the same per-row TVs in another order
        fa, fw = ga.pop("fidelity"), wa.pop("fidelity")
        assert fa.pop("metric") == fw.pop("metric") and fa == pytest.approx(fw, rel=1e-9)
    assert ga == wa


def _attrs(url: Path) -> dict:
    import zarr

    return zarr.open_group(str(url), mode="r").attrs.asdict()


# ------------------------------------------------------------------------------ extend


@pytest.mark.parametrize("encoding", ["dense", "topk:2"])
def test_extend_equals_a_store_made_with_more_crops(world, capsys, encoding):
    small = _pre(capsys, world, world["both"], f"r3-{encoding}.zarr", 3, "--encoding", encoding)
    big = _pre(capsys, world, world["both"], f"r5-{encoding}.zarr", 5, "--encoding", encoding)
    out = world["root"] / f"ext-{encoding}.zarr"
    proc = run(capsys, *_extend_args(world, small, out))  # --teachers omitted: the recorded specs
    assert proc.returncode == 0, proc.stderr
    assert "crops/s over" in proc.stderr and "in the teachers" in proc.stderr, proc.stderr  # where the time went, as precompute
    _assert_same_labels(out, big, exact_fidelity=encoding == "dense")
    if encoding != "dense":
        fa, fb = (np.asarray(__import__("zarr").open_group(str(u), mode="r")["fidelity"][:]) for u in (out, big))
        np.testing.assert_allclose(fa, fb, rtol=1e-12)
    attrs, src = _attrs(out), _attrs(small)
    assert attrs["store_id"] != src["store_id"]
    assert attrs["extended_from"]["store_id"] == src["store_id"] and attrs["extended_from"]["crops_per_image"] == 3
    assert store_arrays(small)["windows"].shape[1] == 3  # the source is untouched


def test_extend_killed_anywhere_then_rerun_equals_uninterrupted(world, capsys):
    rng = random.Random(SEED)
    small = _pre(capsys, world, world["both"], "r3-dense.zarr", 3)
    big = _pre(capsys, world, world["both"], "r5-dense.zarr", 5)
    out = world["root"] / "ext-killed.zarr"
    point = rng.choice(["create-attrs:1", f"shard-windows:{rng.randint(1, 5)}", f"shard-before-done:{rng.randint(1, 5)}",
                        f"shard-done:{rng.randint(1, 4)}", "finalize:1"])
    killed = cli(*_extend_args(world, small, out), kill_at=point)
    assert killed.returncode == -9, f"seed {SEED} {point}: {killed.stderr}"
    if (out / "zarr.json").exists() and _attrs(out):
        assert "completed" not in _attrs(out), f"seed {SEED} {point}"
        got, want = store_arrays(out), store_arrays(big)
        done = got["done"]
        for name in ("windows", "flips", "probs"):
            assert np.array_equal(got[name][done], want[name][done]), f"seed {SEED} {point}: {name} of a done image"
    proc = run(capsys, *_extend_args(world, small, out))
    assert proc.returncode == 0, f"seed {SEED} {point}: {proc.stderr}"
    _assert_same_labels(out, big)


# ------------------------------------------------------------------------------ merge


def test_dense_merge_equals_one_precompute_with_both_teachers(world, capsys):
    both = _pre(capsys, world, world["both"], "r3-dense.zarr", 3)
    a = _pre(capsys, world, world["t1"], "only-t1.zarr")
    b = _pre(capsys, world, world["t2"], "only-t2.zarr")
    out = world["root"] / "merged.zarr"
    proc = run(capsys, "merge", str(a), str(b), "--out", str(out), "--images-per-shard", "2")
    assert proc.returncode == 0, proc.stderr
    got, want = store_arrays(out), store_arrays(both)
    for name in ("paths", "targets", "sizes", "excluded", "windows", "flips", "done"):
        assert np.array_equal(got[name], want[name]), name
    p, q = got["probs"].astype(np.float32), want["probs"].astype(np.float32)
    assert np.all(np.abs(p - q) <= 2 * np.spacing(np.abs(want["probs"])).astype(np.float32)), np.abs(p - q).max()  # <= 2 fp16 ulps
    assert _label_attrs(out) == _label_attrs(both)  # teachers with their weights, crop policy, dataset, ...
    attrs = _attrs(out)
    assert [(m["store_id"], m["weight"]) for m in attrs["merged_from"]] == [(_attrs(a)["store_id"], 1.0), (_attrs(b)["store_id"], 0.5)]

    weighted = world["root"] / "merged-2-1.zarr"
    proc = run(capsys, "merge", str(a), str(b), "--out", str(weighted), "--weights", "2,1")
    assert proc.returncode == 0, proc.stderr
    assert [t["weight"] for t in _attrs(weighted)["teachers"]] == [2.0, 1.0]
    rows = normalise_rows(store_arrays(weighted)["probs"])
    mix = (2 * normalise_rows(store_arrays(a)["probs"]) + normalise_rows(store_arrays(b)["probs"])) / 3
    np.testing.assert_allclose(rows, mix, atol=1e-3)
    # its recorded specs carry those weights, so they rebuild its ensemble: extend (which takes them by
    # default) grows it; it was refused with "teacher 1 ...: weight 1.0 (the store: 2.0) ... omit --teachers"
    assert [t["spec"].rsplit(":", 1)[-1] for t in _attrs(weighted)["teachers"]] == ["w=2.0", "w=1.0"]
    proc = run(capsys, *_extend_args(world, weighted, world["root"] / "merged-2-1-r5.zarr"))
    assert proc.returncode == 0, proc.stderr


def test_topk_merge_keeps_the_union_of_supports_and_records_its_fidelity(world, capsys):
    a = _pre(capsys, world, world["t1"], "only-t1-top2.zarr", 3, "--encoding", "topk:2")
    b = _pre(capsys, world, world["t2"], "only-t2-top2.zarr", 3, "--encoding", "topk:2")
    out = world["root"] / "merged-top.zarr"
    proc = run(capsys, "merge", str(a), str(b), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    attrs = _attrs(out)
    assert attrs["label_encoding"] == {"kind": "topk", "k": 4}  # 2 + 2: the union of supports
    ga, gb, gm = store_arrays(a), store_arrays(b), store_arrays(out)
    for i, j, m in zip(ga["topk_idx"].reshape(-1, 2), gb["topk_idx"].reshape(-1, 2), gm["topk_idx"].reshape(-1, 4)):
        assert set(i) | set(j) <= set(m)
    exact = (decode_topk(ga["topk_idx"], ga["topk_val"], CLASSES) + 0.5 * decode_topk(gb["topk_idx"], gb["topk_val"], CLASSES)) / 1.5
    stored = decode_topk(gm["topk_idx"], gm["topk_val"], CLASSES)
    tv = 0.5 * np.abs(exact - stored).sum(-1)
    assert attrs["fidelity"]["mean_tv"] == pytest.approx(float(tv.mean()), abs=1e-6)
    assert attrs["fidelity"]["max_tv"] == pytest.approx(float(tv.max()), abs=1e-6)
    assert attrs["fidelity_reference"].startswith("the weighted mixture")
    assert [m["fidelity"]["mean_tv"] for m in attrs["merged_from"]] == [_attrs(a)["fidelity"]["mean_tv"], _attrs(b)["fidelity"]["mean_tv"]]

    info = json.loads(run(capsys, "inspect", str(out), "--json").stdout)
    bound = info["teacher_tv_bound"]
    want = attrs["fidelity"]["mean_tv"] + sum(m["share"] * m["fidelity"]["mean_tv"] for m in attrs["merged_from"])
    assert bound == pytest.approx(want)

    dense_a = _pre(capsys, world, world["t1"], "only-t1.zarr")  # a dense input: its support is every class
    mixed = world["root"] / "merged-mixed.zarr"
    assert run(capsys, "merge", str(dense_a), str(b), "--out", str(mixed)).returncode == 0
    assert _attrs(mixed)["label_encoding"] == {"kind": "dense-f16"}
    want = (normalise_rows(store_arrays(dense_a)["probs"]) + 0.5 * decode_topk(gb["topk_idx"], gb["topk_val"], CLASSES)) / 1.5
    np.testing.assert_allclose(normalise_rows(store_arrays(mixed)["probs"]), want, atol=1e-3)

    # verify recomputes such a store's crops through all its teachers: a mixture of truncated rows never equals
    # their exact ensemble, so it is judged against the bound its history gives (it used to FAIL forever,
    # healthy); labels that are wrong still fail and name their shard
    for merged in (out, mixed):
        proc = run(capsys, "verify", str(merged), "--data", str(world["data"]), "--teachers", world["both"], "--sample", "30")
        assert proc.returncode == 0 and "merged from top-k inputs" in proc.stdout.replace("\n", " "), proc.stdout
    import zarr

    group = zarr.open_group(str(mixed), mode="r+")
    rows = np.asarray(group["probs"][0:2])
    group["probs"][0:2] = rows[..., ::-1]  # shard 0's rows reversed: another class on top
    proc = run(capsys, "verify", str(mixed), "--data", str(world["data"]), "--teachers", world["both"], "--sample", "30")
    assert proc.returncode == 1 and "damaged shards: 0" in proc.stdout, proc.stdout


def test_merge_killed_anywhere_then_rerun_equals_uninterrupted(world, capsys):
    rng = random.Random(SEED + 1)
    a = _pre(capsys, world, world["t1"], "only-t1.zarr")
    b = _pre(capsys, world, world["t2"], "only-t2.zarr")
    ref = world["root"] / "merged-ref.zarr"
    two = ("--images-per-shard", "2")  # 5 shards
    assert run(capsys, "merge", str(a), str(b), "--out", str(ref), *two).returncode == 0
    out = world["root"] / "merged-killed.zarr"
    point = rng.choice(["create-attrs:1", f"shard-windows:{rng.randint(1, 5)}", f"shard-before-done:{rng.randint(1, 5)}",
                        f"shard-done:{rng.randint(1, 4)}", "finalize:1"])
    killed = cli("merge", str(a), str(b), "--out", str(out), *two, kill_at=point)
    assert killed.returncode == -9, f"seed {SEED} {point}: {killed.stderr}"
    if (out / "zarr.json").exists() and _attrs(out):
        assert "completed" not in _attrs(out)
        got, want = store_arrays(out), store_arrays(ref)
        done = got["done"]
        assert np.array_equal(got["probs"][done], want["probs"][done]), f"seed {SEED} {point}"
    proc = run(capsys, "merge", str(a), str(b), "--out", str(out), *two)
    assert proc.returncode == 0, f"seed {SEED} {point}: {proc.stderr}"
    _assert_same_labels(out, ref)


# ------------------------------------------------------------------------------ inspect


def test_inspect_json_and_table_show_the_history(world, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    ext = world["root"] / "ext-dense.zarr"  # made by the tests above; made here if run alone
    if not ext.exists():
        assert run(capsys, *_extend_args(world, _pre(capsys, world, world["both"], "r3-dense.zarr"), ext)).returncode == 0
    merged = world["root"] / "merged.zarr"
    if not merged.exists():
        a, b = _pre(capsys, world, world["t1"], "only-t1.zarr"), _pre(capsys, world, world["t2"], "only-t2.zarr")
        assert run(capsys, "merge", str(a), str(b), "--out", str(merged)).returncode == 0
    info = json.loads(run(capsys, "inspect", str(ext), "--json", "--sample", "64").stdout)
    for key in ("teachers", "class_names", "crops_per_image", "encoding", "complete", "bytes_on_disk", "labels", "dataset",
                "crop", "decoder", "store_id", "created", "completed", "extended_from", "merged_from"):
        assert key in info, key
    assert info["crops_per_image"] == 5 and info["complete"] and info["extended_from"]["crops_per_image"] == 3
    assert info["class_names"] == [f"class_{k}" for k in range(CLASSES)]
    table = run(capsys, "inspect", str(ext)).stdout
    assert f"extended from {info['extended_from']['store_id'][:12]} (3 crops/image)" in table
    table = run(capsys, "inspect", str(merged)).stdout
    assert table.count("merged from ") == 2 and "share 0.6667" in table and "share 0.3333" in table


# ------------------------------------------------------------------------------ bad input


def test_extend_bad_input(world, capsys):
    small = _pre(capsys, world, world["both"], "r3-dense.zarr", 3)
    top = _pre(capsys, world, world["both"], "r3-topk:2.zarr", 3, "--encoding", "topk:2")
    other_data = make_jpeg_tree(world["root"] / "other", classes=CLASSES, per_class=2, seed=9)
    out = str(world["root"] / "never.zarr")
    cases = [
        (_extend_args(world, small, Path(out), 3), ("--crops-per-image 3", "already has 3")),
        (_extend_args(world, small, small), ("--out", "is STORE itself")),
        (_extend_args(world, world["root"] / "nope.zarr", Path(out)), ("STORE", "not a mealkd label store")),
        (_extend_args(world, small, Path(out)) + ["--teachers", world["t1"]], ("--teachers", "1 teacher(s) given, the store has 2")),
        (_extend_args(world, small, Path(out))[:-4] + ["--data", str(other_data), "--batch-size", "4"], ("--data", "not the dataset")),
        (_extend_args(world, top, Path(out), 5, "--images-per-shard", "3"), ("--images-per-shard 3", "multiple of the source's 2")),
        (_extend_args(world, small, Path(out)) + ["--compile"], ("--compile", "TorchScript")),  # the teachers are TorchScript files
        (_extend_args(world, small, world["root"] / "only-t1.zarr" if (world["root"] / "only-t1.zarr").exists()
                      else _pre(capsys, world, world["t1"], "only-t1.zarr")), ("--out", "a different label store")),
    ]
    for argv, needles in cases:
        assert_user_error(run(capsys, *argv), *needles)
    assert not Path(out).exists()


def test_extend_names_recorded_teachers_it_cannot_find(world, capsys, tmp_path):
    """A store records --teachers as precompute was given them (often relative): extend run elsewhere, or after
    the file moved, said only 'TorchScript file t.pt does not exist', not that the path came from the store."""
    import shutil

    moved = tmp_path / "t1.pt"
    shutil.copy(world["t1"], moved)
    store = _pre(capsys, world, str(moved), "moved-teacher.zarr")
    moved.unlink()
    proc = run(capsys, *_extend_args(world, store, tmp_path / "out.zarr"))
    assert_user_error(proc, f"STORE {store}: its recorded teachers ({moved}) cannot be loaded here", "does not exist",
                      "run from the directory it ran in, or pass --teachers")


def test_merge_bad_input(world, capsys):
    a = _pre(capsys, world, world["t1"], "only-t1.zarr")
    b = _pre(capsys, world, world["t2"], "only-t2.zarr")
    seed1 = _pre(capsys, world, world["t2"], "t2-seed1.zarr", 3, "--seed", "1")
    r5 = _pre(capsys, world, world["both"], "r5-dense.zarr", 5)
    hot = _pre(capsys, world, world["t2"], "t2-temp2.zarr", 3, "--temperature", "2")
    flipped = _pre(capsys, world, world["t2"], "t2-flipped.zarr")
    import zarr

    windows = zarr.open_group(str(flipped), mode="r+")["windows"]  # same attributes, one window moved
    w = np.asarray(windows[3:4])
    w[0, 1, 0] += 1
    windows[3:4] = w
    out = world["root"] / "never-merged.zarr"
    cases = [
        (["merge", str(a), "--out", str(out)], ("STORES", "at least two")),
        (["merge", str(a), str(a), "--out", str(out)], ("STORES", "same store")),
        (["merge", str(a), str(seed1), "--out", str(out)], ("t2-seed1.zarr", "crop seed 1")),
        (["merge", str(a), str(r5), "--out", str(out)], ("r5-dense.zarr", "5 crops per image")),
        (["merge", str(a), str(hot), "--out", str(out)], ("t2-temp2.zarr", "temperature 2")),
        (["merge", str(a), str(flipped), "--out", str(out)], ("t2-flipped.zarr", "windows/flips", "image 3, crop 1")),
        (["merge", str(a), str(b), "--out", str(out), "--weights", "1"], ("--weights", "one per store")),
        (["merge", str(a), str(b), "--out", str(out), "--weights", "1,-2"], ("--weights", "positive")),
        (["merge", str(a), str(b), "--out", str(out), "--weights", "1,x"], ("--weights", "comma list")),
        (["merge", str(a), str(b), "--out", str(out), "--encoding", "topk:9"], ("topk:9", "K < num_classes")),
        (["merge", str(a), str(world["root"] / "nope.zarr"), "--out", str(out)], ("STORES", "nope.zarr")),
        (["merge", str(a), str(b), "--out", str(a)], ("--out", "one of the input stores")),
        (["merge", str(a), str(b), "--out", str(r5)], ("--out", "a different label store")),
    ]
    for argv, needles in cases:
        assert_user_error(run(capsys, *argv), *needles)
    assert not out.exists()
    other = make_jpeg_tree(world["root"] / "other2", classes=CLASSES, per_class=2, seed=11)
    foreign = world["root"] / "foreign.zarr"
    assert run(capsys, "precompute", "--data", str(other), "--teachers", world["t2"], "--out", str(foreign), "--crops-per-image", "3",
               "--image-size", "16", "--batch-size", "4", "--images-per-shard", "2", "--device", "cpu").returncode == 0
    assert_user_error(run(capsys, "merge", str(a), str(foreign), "--out", str(out)), "foreign.zarr", "different dataset")


def test_merge_weights_that_overflow_are_one_line_and_nothing_is_written(world, capsys):
    """Each weight finite, their sum not (1e308 + 1e308 = inf): the shares would be 0 and every merged row
    NaN; refused before --out is created (it was a 'probs contain NaN/inf' traceback and a half-written store)."""
    a = _pre(capsys, world, world["t1"], "only-t1.zarr")
    b = _pre(capsys, world, world["t2"], "only-t2.zarr")
    out = world["root"] / "never-overflow.zarr"
    assert_user_error(run(capsys, "merge", str(a), str(b), "--out", str(out), "--weights", "1e308,1e308"),
                      "--weights 1e308,1e308", "sum")
    assert not out.exists()


def test_rerun_with_another_images_per_shard_is_refused_naming_both_values(world, capsys):
    """A rerun of extend / merge whose --images-per-shard differs from the store's: one line naming the
    flag and both values, as precompute (merge used to keep the store's silently; extend blamed the crop count)."""
    small = _pre(capsys, world, world["both"], "r3-dense.zarr", 3)
    ext = world["root"] / "ext-dense.zarr"
    if not ext.exists():
        assert run(capsys, *_extend_args(world, small, ext)).returncode == 0
    ips = _attrs(ext)["images_per_shard"]
    assert_user_error(run(capsys, *_extend_args(world, small, ext, 5, "--images-per-shard", str(ips + 1))),
                      f"--images-per-shard {ips + 1} (the store: {ips})", str(ext))
    a, b = _pre(capsys, world, world["t1"], "only-t1.zarr"), _pre(capsys, world, world["t2"], "only-t2.zarr")
    merged = world["root"] / "merged.zarr"
    if not merged.exists():
        assert run(capsys, "merge", str(a), str(b), "--out", str(merged), "--images-per-shard", "2").returncode == 0
    assert_user_error(run(capsys, "merge", str(a), str(b), "--out", str(merged), "--images-per-shard", "3"),
                      "--images-per-shard 3 (the store: 2)", str(merged))
    assert run(capsys, "merge", str(a), str(b), "--out", str(merged)).returncode == 0  # omitted: the store's
