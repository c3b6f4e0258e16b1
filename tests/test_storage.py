"""Label store: round trips, encodings, validation errors, URLs and `cli.py inspect` (real Zarr stores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from mealkd import storage
from mealkd.errors import UserError
from mealkd.storage.encoding import normalise_rows, to_f16

REPO = Path(__file__).resolve().parents[1]


def softmax_rows(rng, shape, sharp=4.0):
    logits = rng.standard_normal(shape).astype(np.float32) * sharp
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def make_data(n, r, c, seed=0):
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, 500, (n, r, 4)).astype(np.int32)
    flips = rng.random((n, r)) < 0.5
    probs = softmax_rows(rng, (n, r, c))
    return windows, flips, probs


def new_store(url, n=70, r=3, c=40, encoding="dense", ips=16, fingerprint="fp0", excluded=None):
    names = [f"class_{i:03d}" for i in range(c)]
    storage.create_store(
        url,
        attributes={"class_names": names, "dataset": {"num_images": n, "fingerprint": fingerprint},
                    "crop": {"image_size": 224, "scale": [0.08, 1.0], "ratio": [0.75, 1.333], "flip_prob": 0.5, "seed": 0},
                    "teachers": [{"spec": "torchvision:resnet18", "weights_sha256": "ab" * 32, "weight": 1.0}]},
        paths=[f"class_{i % c:03d}/img_{i:05d}.jpg" for i in range(n)],
        targets=np.arange(n) % c,
        sizes=np.stack([np.arange(n) + 100, np.arange(n) + 200], 1),
        crops_per_image=r, num_classes=c, encoding=encoding, excluded=excluded, images_per_shard=ips,
    )
    return names


def fill(url, data, shards=None):
    windows, flips, probs = data
    w = storage.StoreWriter(url)
    for s in (w.pending_shards() if shards is None else shards):
        a, b = w.shard_range(s)
        w.write_shard(s, windows[a:b], flips[a:b], probs[a:b])
    return w


def ref_topk_decode(idx, val, c):
    """Independent per-row decode: k values at their indices, leftover spread over the rest."""
    out = np.empty(idx.shape[:-1] + (c,), np.float64)
    for pos in np.ndindex(*idx.shape[:-1]):
        v = val[pos].astype(np.float64)
        s = v.sum()
        row = np.full(c, max(0.0, 1.0 - s) / (c - len(v)))
        row[idx[pos].astype(int)] = v
        out[pos] = row / row.sum()
    return out


# ------------------------------------------------------------------------------ round trips


def test_parse_encoding():
    assert storage.parse_encoding("dense") == ("dense-f16", None)
    assert storage.parse_encoding("dense-f16") == ("dense-f16", None)
    assert storage.parse_encoding("topk:20") == ("topk", 20)
    for bad in ("topk:0", "topk", "sparse", "topk:x", ""):
        with pytest.raises(UserError):
            storage.parse_encoding(bad)


def test_dense_round_trip(tmp_path):
    url = str(tmp_path / "dense.zarr")
    n, r, c = 70, 3, 40
    names = new_store(url, n, r, c, "dense", excluded=np.arange(n) == 5)
    data = make_data(n, r, c)
    w = fill(url, data)
    assert w.num_shards == 5 and w.shard_range(4) == (64, 70)
    assert w.finalize() is True
    st = storage.open_store(url, fingerprint="fp0", class_names=names)
    windows, flips, probs = data
    assert st.encoding == "dense-f16" and st.topk is None and st.attrs["label_encoding"] == {"kind": "dense-f16"}
    assert st.paths == [f"class_{i % c:03d}/img_{i:05d}.jpg" for i in range(n)]
    np.testing.assert_array_equal(st.targets, np.arange(n) % c)
    np.testing.assert_array_equal(st.sizes[:, 0], np.arange(n) + 100)
    np.testing.assert_array_equal(st.windows, windows)
    np.testing.assert_array_equal(st.flips, flips)
    assert st.excluded.sum() == 1 and st.excluded[5] and st.done.all()
    assert st.windows.dtype == np.int32 and st.targets.dtype == np.int32 and st.sizes.dtype == np.int32
    # stored rows are exactly the fp16 rounding of the input, renormalised
    expect = normalise_rows(probs.astype(np.float16))
    ii = np.repeat(np.arange(n), r)
    cc = np.tile(np.arange(r), n)
    got = st.labels(ii, cc).reshape(n, r, c)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got, probs, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    # slot reads agree with random reads, in the requested order (duplicates too)
    for slot in range(r):
        np.testing.assert_array_equal(st.slot_labels(slot), got[:, slot])
    ids = np.array([69, 3, 3, 17, 0, 64])
    np.testing.assert_array_equal(st.slot_labels(2, ids), got[ids, 2])
    rng = np.random.default_rng(3)
    ii, cc = rng.integers(0, n, 50), rng.integers(0, r, 50)
    np.testing.assert_array_equal(st.labels(ii, cc), got[ii, cc])
    assert st.labels(np.array([], int), np.array([], int)).shape == (0, c)
    with pytest.raises(IndexError):
        st.labels(np.array([n]), np.array([0]))


def test_topk_round_trip_and_fidelity(tmp_path):
    url = str(tmp_path / "topk.zarr")
    n, r, c, k = 50, 2, 30, 4
    new_store(url, n, r, c, f"topk:{k}", ips=8, excluded=np.arange(n) == 3)
    data = make_data(n, r, c, seed=1)
    probs = data[2]
    probs[3] = 1.0 / c  # placeholder rows of an unreadable image: not counted in the fidelity
    w = fill(url, data)
    assert w.finalize()
    st = storage.open_store(url)
    assert st.encoding == "topk" and st.topk == k and st.attrs["label_encoding"] == {"kind": "topk", "k": k}
    g = zarr.open_group(url, mode="r")
    idx, val = g["topk_idx"][:], g["topk_val"][:]
    assert idx.dtype == np.uint16 and val.dtype == np.float16
    # stored entries are the true top-k, values rounded to fp16, sorted by value
    true_top = np.sort(np.argsort(-probs, axis=-1)[..., :k], axis=-1)
    real = np.arange(n) != 3  # (ties in the uniform rows of image 3 make any k indices valid)
    np.testing.assert_array_equal(np.sort(idx.astype(int), axis=-1)[real], true_top[real])
    np.testing.assert_array_equal(val, np.take_along_axis(probs, idx.astype(int), -1).astype(np.float16))
    assert np.all(np.diff(val.astype(np.float32), axis=-1) <= 0)
    ref = ref_topk_decode(idx, val, c)
    got = st.labels(np.repeat(np.arange(n), r), np.tile(np.arange(r), n)).reshape(n, r, c)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.slot_labels(1), ref[:, 1], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(st.slot_labels(1), got[:, 1])
    # fidelity summary = mean/max total variation between the dense rows and the decoded rows
    tv = np.delete(0.5 * np.abs(probs - ref).sum(-1), 3, axis=0)
    fid = st.attrs["fidelity"]
    assert fid["rows"] == (n - 1) * r
    assert fid["mean_tv"] == pytest.approx(tv.mean(), rel=1e-4)
    assert fid["max_tv"] == pytest.approx(tv.max(), rel=1e-4)
    assert "completed" in st.attrs


def test_topk_decode_when_fp16_values_exceed_one():
    idx = np.array([[0, 1]], np.uint16)
    val = np.array([[0.7, 0.3007]], np.float16)  # fp16 sum > 1
    row = storage.decode_topk(idx, val, 5)[0]
    assert row[2:].sum() == 0 and row.sum() == pytest.approx(1.0, abs=1e-7)


def test_finalize_incomplete_then_idempotent(tmp_path):
    url = str(tmp_path / "s.zarr")
    new_store(url)
    data = make_data(70, 3, 40)
    w = fill(url, data, shards=[0, 2])
    assert w.pending_shards() == [1, 3, 4]
    assert w.finalize() is False
    assert "completed" not in zarr.open_group(url, mode="r").attrs
    fill(url, data)
    assert w.pending_shards() == []
    assert w.finalize() is True
    first = json.loads((Path(url) / "zarr.json").read_text())
    assert storage.StoreWriter(url).finalize() is True
    assert json.loads((Path(url) / "zarr.json").read_text()) == first


def test_default_layout_is_sharded_and_chunk_aligned(tmp_path):
    url = str(tmp_path / "big.zarr")
    n, r, c = 3000, 100, 1000
    storage.create_store(url, attributes={}, paths=[str(i) for i in range(n)], targets=np.zeros(n),
                         sizes=np.ones((n, 2)), crops_per_image=r, num_classes=c, encoding="dense")
    g = zarr.open_group(url, mode="r")
    ips = g.attrs["images_per_shard"]
    assert ips == 1328  # 256 MiB of fp16 rows, multiple of 16: ImageNet (1,281,167 images) -> 965 shards
    assert g["probs"].shards == (ips, r, c) and g["probs"].chunks == (16, 1, c)
    for name in ("windows", "flips", "done"):
        assert g[name].chunks[0] == ips, name
    codec = g["probs"].metadata.codecs[0].codecs[-1]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"
    # nothing but metadata and the create-time arrays on disk yet
    assert not (Path(url) / "probs" / "c").exists()


def test_writer_validates_input(tmp_path):
    url = str(tmp_path / "v.zarr")
    new_store(url, n=20, r=2, c=10, ips=8)
    w = storage.StoreWriter(url)
    windows, flips, probs = make_data(8, 2, 10)
    bad = probs.copy()
    bad[0, 0, 0] += 0.1
    for args in [(windows[:7], flips[:7], probs[:7]), (windows, flips.astype(np.int8), probs),
                 (windows, flips, bad), (windows, flips, np.full_like(probs, np.nan)),
                 (windows.astype(np.float32), flips, probs)]:
        with pytest.raises(ValueError):
            w.write_shard(0, *args)
    with pytest.raises(IndexError):
        w.shard_range(3)
    assert w.pending_shards() == [0, 1, 2]


def test_create_refuses_existing_and_bad_encoding(tmp_path):
    url = str(tmp_path / "s.zarr")
    new_store(url)
    with pytest.raises(UserError, match="already exists"):
        new_store(url)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="already exists"):
        new_store(str(tmp_path / "other"))
    with pytest.raises(UserError, match="K < num_classes"):
        new_store(str(tmp_path / "t.zarr"), c=10, encoding="topk:10")


def test_fp16_cast_paths_agree():
    torch = pytest.importorskip("torch")  # noqa: F841 - makes to_f16 take the torch path
    x = softmax_rows(np.random.default_rng(0), (64, 1000), sharp=6.0)
    assert np.array_equal(to_f16(x).view(np.uint16), x.astype(np.float16).view(np.uint16))


# ------------------------------------------------------------------------------ refusals


def one_line_error(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_reader_refusals(tmp_path):
    url = str(tmp_path / "s.zarr")
    names = new_store(url)
    data = make_data(70, 3, 40)
    fill(url, data, shards=[0, 1])
    # incomplete
    msg = one_line_error(lambda: storage.open_store(url))
    assert "incomplete" in msg and "32/70" in msg and "precompute" in msg
    assert storage.open_store(url, require_complete=False).done.sum() == 32
    fill(url, data)
    storage.open_store(url)
    # fingerprint / class names
    msg = one_line_error(lambda: storage.open_store(url, fingerprint="fp1"))
    assert "fingerprint" in msg and "changed" in msg
    other = list(names)
    other[7] = "zebra"
    msg = one_line_error(lambda: storage.open_store(url, class_names=other))
    assert "class 7" in msg and "'class_007'" in msg and "'zebra'" in msg
    msg = one_line_error(lambda: storage.open_store(url, class_names=names[:-1]))
    assert "40 classes" in msg and "39" in msg
    # not a store: missing path, empty dir, a plain zarr group, a file
    for p in (tmp_path / "missing", tmp_path):
        assert "not a mealkd label store" in one_line_error(lambda: storage.open_store(str(p)))
        assert storage.store_exists(str(p)) is False
    assert "(a directory without zarr.json)" in one_line_error(lambda: storage.open_store(str(tmp_path)))  # zarr's GroupNotFoundError text before
    zarr.create_group(str(tmp_path / "plain.zarr"), attributes={"format": "other"})
    assert "not a mealkd label store" in one_line_error(lambda: storage.open_store(str(tmp_path / "plain.zarr")))
    (tmp_path / "f.txt").write_text("x")
    assert "not a mealkd label store" in one_line_error(lambda: storage.open_store(str(tmp_path / "f.txt")))
    assert storage.store_exists(url) is True
    # newer / unknown version
    g = zarr.open_group(url, mode="r+")
    g.update_attributes({"version": storage.VERSION + 1})
    msg = one_line_error(lambda: storage.open_store(url))
    assert "newer" in msg and "upgrade" in msg
    g.update_attributes({"version": "one"})
    assert "unknown label-store version" in one_line_error(lambda: storage.open_store(url))
    assert "unknown" in one_line_error(lambda: storage.StoreWriter(url))


# ------------------------------------------------------------------------------ URLs


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    url = f"memory://mealkd-test/{tmp_path.name}/s.zarr" if scheme == "memory" else (tmp_path / "s.zarr").as_uri()
    assert not storage.store_exists(url)
    n, r, c = 20, 2, 12
    new_store(url, n, r, c, "topk:3", ips=8)
    data = make_data(n, r, c)
    w = fill(url, data)
    assert w.finalize()
    st = storage.open_store(url, fingerprint="fp0")
    np.testing.assert_array_equal(st.windows, data[0])
    assert st.labels(np.array([3, 19]), np.array([1, 0])).shape == (2, c)
    assert st.nbytes_on_disk() > 0
    with pytest.raises(UserError, match="already exists"):
        new_store(url)
    if scheme == "file":
        assert (tmp_path / "s.zarr" / "zarr.json").exists()


# ------------------------------------------------------------------------------ cli inspect


def run_cli(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_inspect(tmp_path):
    bad = run_cli("inspect", str(tmp_path / "nope.zarr"))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a mealkd label store" in lines[0] and "Traceback" not in bad.stderr

    url = str(tmp_path / "s.zarr")
    new_store(url, n=40, r=3, c=12, encoding="topk:3", ips=8)
    fill(url, make_data(40, 3, 12), shards=[0, 1, 2])
    part = run_cli("inspect", url)
    assert part.returncode == 0, part.stderr
    assert "24/40" in part.stdout and "INCOMPLETE" in part.stdout

    fill(url, make_data(40, 3, 12))
    storage.StoreWriter(url).finalize()
    ok = run_cli("inspect", url)
    assert ok.returncode == 0, ok.stderr
    out = ok.stdout
    for needle in ("torchvision:resnet18", "12 (class_000, class_001", "crops per image", "top-3",
                   "mean TV", "40/40", "per stored crop", "mean top-1 prob", "entropy", "fp0", "image_size"):
        assert needle in out, (needle, out)


def test_cli_inspect_sample_zero_samples_nothing_without_warnings(tmp_path):
    """--sample 0 (valid: no label statistics) on a complete store: no numpy 'Mean of empty slice'
    RuntimeWarnings (label_stats averaged an empty sample), and the JSON says 0 samples."""
    url = str(tmp_path / "s.zarr")
    new_store(url, n=16, r=2, c=5, ips=8)
    fill(url, make_data(16, 2, 5))
    storage.StoreWriter(url).finalize()
    for extra in ((), ("--json",)):
        proc = run_cli("inspect", url, "--sample", "0", *extra)
        assert proc.returncode == 0 and "Warning" not in proc.stderr and "empty slice" not in proc.stderr, proc.stderr
        if not extra:
            assert "none sampled (--sample 0)" in proc.stdout and "no finished images" not in proc.stdout, proc.stdout
    assert json.loads(proc.stdout)["labels"] == {"samples": 0, "mean_top1": None, "mean_entropy": None, "top1_matches_target": None}


@pytest.mark.parametrize("encoding", ["dense", "topk:5"])
def test_raw_fast_path_matches_zarr_path(tmp_path, encoding):
    url = str(tmp_path / "s.zarr")
    n, r, c = 90, 3, 40
    new_store(url, n, r, c, encoding, ips=32)
    fill(url, make_data(n, r, c, seed=4))
    st = storage.open_store(url)
    assert st._raw is not None  # complete + local: the raw path is used
    rng = np.random.default_rng(0)
    ii, cc = rng.integers(0, n, 300), rng.integers(0, r, 300)
    ids = rng.permutation(n)[:50]
    fast = (st.labels(ii, cc), st.slot_labels(1), st.slot_labels(2, ids))
    st.fast_path = False
    slow = (st.labels(ii, cc), st.slot_labels(1), st.slot_labels(2, ids))
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    # one open per shard and read, every file closed after (it was one open per inner chunk: a round trip each on NFS)
    st.fast_path = True
    opened, real_open = [], os.open
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
        st.labels(ii, cc)
    assert len(opened) == len(set(opened)) and len({p.rsplit("/c/", 1)[0] for p in opened}) == len(st._raw), opened
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # an incomplete store always reads through zarr (its shards may still change)
    url2 = str(tmp_path / "part.zarr")
    new_store(url2, n, r, c, encoding, ips=32)
    fill(url2, make_data(n, r, c, seed=4), shards=[0])
    part = storage.open_store(url2, require_complete=False)
    assert part._raw is None
    np.testing.assert_array_equal(part.slot_labels(1, np.arange(32)), fast[1][:32])


def test_a_url_with_one_slash_is_named_not_looked_for_locally(capsys):
    """'s3:/bucket/x' was looked for as a local directory 's3:' and called 'not a mealkd label store'."""
    from mealkd import cli

    for argv in (["inspect", "s3:/bucket/labels.zarr"], ["verify", "gs:/b/s.zarr"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        protocol = argv[1].split(":")[0]
        assert exit_.value.code == 2 and err.startswith(f"error: {argv[1]}: a URL needs two slashes after '{protocol}:'"), err
        assert f"write {protocol}://" in err and "\n" not in err


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_all_zero_row_of_a_done_image_is_damage(tmp_path, monkeypatch, fast_path):
    """A done image whose stored label row is all zero (what zarr returns for a lost chunk) is refused, also when
    it sits past the first block of the row check (checked in blocks: one comparison over a dense ImageNet epoch
    was a 1.3 GB temporary)."""
    from mealkd.storage import reader

    monkeypatch.setattr(reader, "ROW_CHECK_BLOCK", 4)
    url = str(tmp_path / "s.zarr")
    n, r, c = 40, 2, 12
    new_store(url, n, r, c, ips=16)
    fill(url, make_data(n, r, c, seed=2))
    probs = zarr.open_group(url, mode="r+")["probs"]
    row = np.asarray(probs[21:22])
    row[0, 1] = 0
    probs[21:22] = row  # image 21, slot 1: zeros; the rest of its chunk is not
    st = storage.open_store(url)
    st.fast_path = fast_path
    ids = np.arange(n)
    st.slot_labels(0, ids)  # slot 0 is whole
    with pytest.raises(UserError) as err:
        st.slot_labels(1, ids)
    assert "image 21 (shard 1) is marked done but its stored labels are all zero" in str(err.value)
