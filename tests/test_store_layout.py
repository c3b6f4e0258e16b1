"""The windows/flips layout (issue 11): new stores shard them like the labels, one inner chunk per crop
slot of a shard, so stage two's per-slot read fetches ~1/R of them; stores of the older layout (one
plain chunk per shard, built here with zarr the way ``create_store`` used to) stay readable, writable,
verifiable, extendable and mergeable. Real Zarr stores on disk throughout; bytes are counted by a
LocalStore subclass under the real reader (no mocks of the reader)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from mealkd import storage
from mealkd.errors import UserError
from mealkd.precompute.verify import Report, check_integrity
from mealkd.storage.reader import LabelStore

CROPS = ("windows", "flips")


# ------------------------------------------------------------------------------------ helpers
def _synthetic(path: Path, *, n: int, r: int, c: int, ips: int, encoding: str = "dense", seed: int = 0,
               excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A complete store of random windows, flips and label rows (excluded images: zero windows, no
    flips, uniform rows, as precompute writes them); returns the windows and flips written."""
    rng = np.random.default_rng(seed)
    excluded = np.zeros(n, bool) if excluded is None else excluded
    storage.create_store(str(path), attributes={"class_names": [f"c{i}" for i in range(c)],
                                                "crop": {"image_size": 224, "flip_prob": 0.5},
                                                "dataset": {"num_images": n, "fingerprint": "synthetic"}},
                         paths=[f"c/{i}.jpg" for i in range(n)], targets=rng.integers(0, c, n), sizes=np.full((n, 2), 256),
                         crops_per_image=r, num_classes=c, encoding=encoding, excluded=excluded, images_per_shard=ips)
    windows = np.stack([rng.integers(0, 64, (n, r)), rng.integers(0, 64, (n, r)),
                        rng.integers(64, 192, (n, r)), rng.integers(64, 192, (n, r))], -1).astype(np.int32)
    flips = rng.random((n, r)) < 0.5
    windows[excluded], flips[excluded] = 0, False
    logits = rng.normal(size=(n, r, c)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs[excluded] = 1.0 / c
    writer = storage.StoreWriter(str(path))
    for shard in writer.pending_shards():
        lo, hi = writer.shard_range(shard)
        writer.write_shard(shard, windows[lo:hi], flips[lo:hi], probs[lo:hi])
    assert writer.finalize()
    return windows, flips


def _to_old_layout(path: Path) -> None:
    """Rewrite windows/flips as the code before the slot-sharded layout created them: plain chunks
    ``(ips, R, 4)`` / ``(ips, R)`` (one chunk = one shard file, all R slots), same codec and fill
    value, written whole shard by whole shard with ``write_empty_chunks`` (as StoreWriter does)."""
    from zarr.codecs import BloscCodec

    group = zarr.open_group(str(path), mode="r+")
    ips = int(group.attrs["images_per_shard"])
    for name, dtype in (("windows", "int32"), ("flips", "bool")):
        data = np.asarray(group[name][:])
        shape = data.shape
        old = group.create_array(name, shape=shape, dtype=dtype, chunks=(ips, *shape[1:]),
                                 compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
                                 fill_value=False if dtype == "bool" else 0, overwrite=True)
        old = old.with_config({"write_empty_chunks": True})
        for lo in range(0, shape[0], ips):
            old[lo:lo + ips] = data[lo:lo + ips]
        assert old.shards is None and old.chunks == (ips, *shape[1:])


def _shard_files(path: Path, name: str) -> set[str]:
    return {p.relative_to(path / name).as_posix() for p in (path / name / "c").rglob("*") if p.is_file()}


class CountingStore(LocalStore):
    """A LocalStore that adds up the bytes every read returns, per array (whole-key and byte-range
    reads alike), and counts the writes per key: what zarr really fetches and stores."""

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.read: dict[str, int] = {}
        self.sets: dict[str, int] = {}

    def _count(self, key: str, buf) -> None:
        if buf is not None and "/c/" in key:  # chunk data, not zarr.json
            name = key.split("/c/", 1)[0]
            self.read[name] = self.read.get(name, 0) + len(buf)

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        self._count(key, buf)
        return buf

    def get_sync(self, key, *, prototype=None, byte_range=None):
        buf = super().get_sync(key, prototype=prototype, byte_range=byte_range)
        self._count(key, buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        bufs = await super().get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, bufs):
            self._count(key, buf)
        return bufs

    async def set(self, key, value) -> None:
        self.sets[key] = self.sets.get(key, 0) + 1
        await super().set(key, value)

    def reset(self) -> None:
        self.read.clear()
        self.sets.clear()


def _counted(path: Path) -> tuple[LabelStore, CountingStore]:
    """The real LabelStore over a CountingStore of ``path``."""
    counting = CountingStore(path, read_only=True)
    group = zarr.open_group(counting, mode="r")
    return LabelStore(str(path), group, group.attrs.asdict()), counting


def _on_disk(path: Path, name: str) -> int:
    return sum(p.stat().st_size for p in (path / name / "c").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same content in both layouts: 70 images (a short last shard), R = 5, shard 2 all excluded."""
    root = tmp_path_factory.mktemp("layout")
    n, r, ips = 70, 5, 16
    excluded = np.zeros(n, bool)
    excluded[32:48] = True  # shard 2: no usable image, so its windows are all zero and its flips all False
    excluded[3] = True
    new = root / "new.zarr"
    windows, flips = _synthetic(new, n=n, r=r, c=12, ips=ips, excluded=excluded)
    old = root / "old.zarr"
    shutil.copytree(new, old)
    _to_old_layout(old)
    return {"new": new, "old": old, "windows": windows, "flips": flips, "n": n, "r": r, "ips": ips}


def _copy(pair, tmp_path: Path, layout: str) -> Path:
    return Path(shutil.copytree(pair[layout], tmp_path / f"{layout}.zarr"))


# ------------------------------------------------------------------------------------ (a) layout
@pytest.mark.parametrize("encoding", ["dense", "topk:3"])
def test_new_store_shards_windows_and_flips_one_slot_per_inner_chunk(tmp_path, encoding):
    n, r, c, ips = 50, 7, 20, 16
    url = tmp_path / "s.zarr"
    _synthetic(url, n=n, r=r, c=c, ips=ips, encoding=encoding)
    g = zarr.open_group(str(url), mode="r")
    assert g["windows"].shards == (ips, r, 4) and g["windows"].chunks == (ips, 1, 4)
    assert g["flips"].shards == (ips, r) and g["flips"].chunks == (ips, 1)
    # the same sharding codec as the labels
    label = g["probs"] if encoding == "dense" else g["topk_idx"]
    assert type(g["windows"].metadata.codecs[0]) is type(label.metadata.codecs[0])
    assert g["windows"].fill_value == 0 and not g["flips"].fill_value
    # still exactly one file per image shard (the 'missing file = damage' rule keeps working)
    shards = -(-n // ips)
    assert _shard_files(url, "windows") == {f"c/{s}/0/0" for s in range(shards)}
    assert _shard_files(url, "flips") == {f"c/{s}/0" for s in range(shards)}


def test_each_shard_file_is_written_once_and_fsynced(tmp_path, monkeypatch):
    """write_shard assigns a whole shard: zarr encodes every slot's inner chunk into one shard file,
    stored with one write, and the writer's fsync (``StoreWriter._fsync``, before ``done``) opens
    each of those files."""
    import os

    import mealkd.storage.schema as schema_module
    import mealkd.storage.writer as writer_module

    n, r, c, ips = 40, 6, 10, 16
    url = tmp_path / "w.zarr"
    storage.create_store(str(url), attributes={"crop": {"flip_prob": 0.5}}, paths=[str(i) for i in range(n)],
                         targets=np.zeros(n), sizes=np.full((n, 2), 100), crops_per_image=r, num_classes=c,
                         encoding="dense", images_per_shard=ips)
    counting = CountingStore(url)
    monkeypatch.setattr(schema_module, "zarr_store", lambda u, read_only: counting)  # what open_group opens
    fsynced: list[str] = []
    real_open = os.open

    def recording_open(path, flags, *args, **kwargs):
        if flags == os.O_RDONLY:
            fsynced.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    writer = storage.StoreWriter(str(url))
    monkeypatch.setattr(writer_module.os, "open", recording_open)
    rng = np.random.default_rng(0)
    for shard in writer.pending_shards():
        lo, hi = writer.shard_range(shard)
        probs = np.full((hi - lo, r, c), 1.0 / c, np.float32)
        writer.write_shard(shard, rng.integers(1, 50, (hi - lo, r, 4)), np.zeros((hi - lo, r), bool), probs)
    monkeypatch.setattr(writer_module.os, "open", real_open)
    shards = range(-(-n // ips))
    files = {f"windows/c/{s}/0/0" for s in shards} | {f"flips/c/{s}/0" for s in shards}
    # one write per shard file (all-False flips too: write_empty_chunks), nothing else under windows/flips
    assert {k: v for k, v in counting.sets.items() if k.startswith(("windows/c/", "flips/c/"))} == dict.fromkeys(files, 1)
    assert files <= {Path(f).relative_to(url).as_posix() for f in fsynced if Path(f).is_file()}


# ------------------------------------------------------------------------------------ (b) same rows
@pytest.mark.parametrize("layout", ["new", "old"])
def test_slot_reads_equal_the_full_arrays_sliced(pair, layout):
    store = storage.open_store(str(pair[layout]))
    windows, flips = pair["windows"], pair["flips"]
    n, r = pair["n"], pair["r"]
    assert np.array_equal(store.windows, windows) and np.array_equal(store.flips, flips)
    rng = np.random.default_rng(1)
    picks = {
        "all": np.arange(n),
        "range": np.arange(5, 41),  # contiguous: read as a slice
        "shuffled with repeats": rng.integers(0, n, 90),  # integer selection, back in the order asked
        "one rank of 3": rng.permutation(n)[1::3],
        "last image": np.array([n - 1]),
    }
    for slot in range(r):
        for what, ids in picks.items():
            w, f = store.slot_crops(slot, ids)
            assert w.dtype == np.int32 and f.dtype == bool
            assert np.array_equal(w, windows[ids, slot]) and np.array_equal(f, flips[ids, slot]), (slot, what)
    w, f = store.slot_crops(0, np.array([], np.int64))
    assert w.shape == (0, 4) and f.shape == (0,)
    ii, cc = rng.integers(0, n, 60), rng.integers(0, r, 60)
    w, f = store.crops(ii, cc)
    assert np.array_equal(w, windows[ii, cc]) and np.array_equal(f, flips[ii, cc])
    w, f = store.block_crops(10, 37)
    assert np.array_equal(w, windows[10:37]) and np.array_equal(f, flips[10:37])
    with pytest.raises(IndexError):
        store.slot_crops(r, np.arange(3))
    with pytest.raises(IndexError):
        store.crops(np.array([0]), np.array([r]))


def test_old_and_new_layouts_read_the_same(pair):
    a, b = storage.open_store(str(pair["new"])), storage.open_store(str(pair["old"]))
    assert zarr.open_group(str(pair["old"]), mode="r")["windows"].shards is None
    ids = np.random.default_rng(2).permutation(pair["n"])
    for slot in range(pair["r"]):
        for got, want in zip(a.slot_crops(slot, ids), b.slot_crops(slot, ids)):
            assert np.array_equal(got, want)
        assert np.array_equal(a.slot_encoded(slot, ids)[0], b.slot_encoded(slot, ids)[0])
    assert np.array_equal(a.windows, b.windows) and np.array_equal(a.flips, b.flips)


# ------------------------------------------------------------------------------------ (c) bytes
@pytest.mark.parametrize("world_size", [1, 8])
def test_one_slot_reads_about_one_rth_of_windows_and_flips(tmp_path, world_size):
    """Bytes zarr fetches for one epoch's slot read (``slot_crops``, K = 1) of one rank: the new layout
    ~1/R of each array (+ a 16-byte index entry per slot and shard), the old layout all of it."""
    n, r, c, ips = 4096, 16, 10, 1024
    new = tmp_path / "new.zarr"
    windows, flips = _synthetic(new, n=n, r=r, c=c, ips=ips)
    old = Path(shutil.copytree(new, tmp_path / "old.zarr"))
    _to_old_layout(old)
    ids = np.random.default_rng(3).permutation(n)[0::world_size]
    fetched = {}
    for layout, path in (("new", new), ("old", old)):
        store, counting = _counted(path)
        store.slot_crops(0, ids)  # reads the arrays' metadata once (cached); chunk bytes only from here
        counting.reset()
        w, f = store.slot_crops(5, ids)
        assert np.array_equal(w, windows[ids, 5]) and np.array_equal(f, flips[ids, 5])
        fetched[layout] = {name: (counting.read.get(name, 0), _on_disk(path, name)) for name in CROPS}
    shards, index = n // ips, 16 * r + 4  # a shard's index: (offset, length) per inner chunk + a CRC32C
    for name in CROPS:
        got, size = fetched["new"][name]
        payload = size - shards * index
        # each shard's index, read whole, and the slot's inner chunk: 1/R of the data (chunks differ a
        # little in compressed size), never another slot's
        assert 0 < got <= 1.1 * payload / r + shards * index, (name, fetched)
        got_old, size_old = fetched["old"][name]
        assert got_old == size_old, (name, fetched)  # every shard file, whole: all R slots
    new_total = [sum(v[i] for v in fetched["new"].values()) for i in (0, 1)]
    old_total = [sum(v[i] for v in fetched["old"].values()) for i in (0, 1)]
    assert new_total[0] <= 1.25 * new_total[1] / r, fetched  # windows + flips: ~1/R
    # the new layout stores about what the old one did (the slot split costs a little compression)
    assert new_total[1] <= 1.15 * old_total[1], fetched
    print(f"\none slot, rank of {world_size}: fetched {fetched} (bytes read, bytes on disk)")


# ------------------------------------------------------------------------------------ (d) verify
@pytest.mark.parametrize("layout", ["new", "old"])
def test_verify_passes_on_both_layouts_and_flags_a_deleted_windows_shard(pair, tmp_path, layout):
    url = _copy(pair, tmp_path, layout)
    report = Report()
    store = check_integrity(str(url), report)
    assert report.ok and not report.damaged_shards, report.checks
    # shard 2 has no usable image: its windows file is not required, its flips file is (flip_prob > 0)
    assert ("windows", 2) not in store.required_chunks() and ("flips", 2) in store.required_chunks()
    (url / "windows" / "c" / "1" / "0" / "0").unlink()
    report = Report()
    check_integrity(str(url), report)
    failed = {c.name: c.detail for c in report.checks if c.status == "FAIL"}
    assert set(failed) == {"chunk files"} and "shard 1: windows" in failed["chunk files"]
    assert report.damaged_shards == {1}
    with pytest.raises(UserError, match="shard 1 of 'windows' is marked done but its file is missing"):
        storage.open_store(str(url))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_repair_and_rewrite_keep_each_layout(pair, tmp_path, layout):
    """verify --repair + a writer rewriting the shard (precompute's resume) works on either layout and
    keeps it: an old store stays old, byte for byte the same rows."""
    from mealkd.precompute.verify import repair

    url = _copy(pair, tmp_path, layout)
    (url / "flips" / "c" / "3" / "0").unlink()
    report = Report()
    check_integrity(str(url), report)
    assert report.damaged_shards == {3}
    repair(str(url), {3})
    writer = storage.StoreWriter(str(url))
    assert writer.pending_shards() == [3]
    lo, hi = writer.shard_range(3)
    src = storage.open_store(str(pair[layout]))
    writer.write_shard(3, pair["windows"][lo:hi], pair["flips"][lo:hi], src.block_labels(lo, hi))
    report = Report()
    check_integrity(str(url), report)
    assert report.ok, report.checks
    got = storage.open_store(str(url))
    assert np.array_equal(got.flips, pair["flips"]) and np.array_equal(got.windows, pair["windows"])
    assert (zarr.open_group(str(url), mode="r")["flips"].shards is None) == (layout == "old")


# ------------------------------------------------------------------------------------ merge / extend
def test_merge_reads_both_layouts_and_writes_the_new_one(tmp_path):
    from rich.console import Console

    from mealkd.precompute.merge import MergeConfig, run_merge

    n, r, c, ips = 40, 4, 9, 16
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    wa, fa = _synthetic(a, n=n, r=r, c=c, ips=ips, seed=7)
    _synthetic(b, n=n, r=r, c=c, ips=ips, seed=7)  # the same crops (same seed), another store id
    b_old = Path(shutil.copytree(b, tmp_path / "b-old.zarr"))
    _to_old_layout(b_old)
    quiet = Console(file=open("/dev/null", "w"))
    outs = {}
    for name, second in (("new", b), ("old", b_old)):
        out = tmp_path / f"merged-{name}.zarr"
        run_merge(MergeConfig(stores=(str(a), str(second)), out=str(out), images_per_shard=ips), quiet)
        outs[name] = storage.open_store(str(out))
        g = zarr.open_group(str(out), mode="r")
        assert g["windows"].shards == (ips, r, 4) and g["flips"].chunks == (ips, 1)
    assert np.array_equal(outs["old"].windows, wa) and np.array_equal(outs["old"].flips, fa)
    assert np.array_equal(outs["old"].block_encoded(0, n)[0], outs["new"].block_encoded(0, n)[0])


def test_extend_and_recompute_on_an_old_layout_store(tmp_path, capsys):
    """A real precompute store rewritten to the old layout extends to the same store as the new-layout
    one, and ``verify --data --teachers`` (the recompute reads sampled crops per slot) passes on it."""
    from tests.test_reliability_common import precompute_args, run, store_arrays, tiny_world

    data, teachers = tiny_world(tmp_path, seed=4)
    new = tmp_path / "src-new.zarr"
    assert run(capsys, *precompute_args(data, teachers, new)).returncode == 0
    old = Path(shutil.copytree(new, tmp_path / "src-old.zarr"))
    _to_old_layout(old)
    proc = run(capsys, "verify", str(old), "--data", str(data), "--teachers", teachers, "--sample", "20", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    extended = {}
    for layout, src in (("new", new), ("old", old)):
        out = tmp_path / f"ext-{layout}.zarr"
        proc = run(capsys, "extend", str(src), "--crops-per-image", "5", "--out", str(out), "--data", str(data),
                   "--batch-size", "4", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        extended[layout] = store_arrays(out)
        assert zarr.open_group(str(out), mode="r")["windows"].chunks[1] == 1
    for name, arr in extended["new"].items():
        assert np.array_equal(arr, extended["old"][name]), name


def test_default_shard_size_gives_every_process_about_four_shards(tmp_path):
    """A store made by a multi-process job gets about 4 shards per process by default (rounded to the inner
    chunk, never below it), so its busiest rank labels about the mean; one process keeps the old size, and
    the size is recorded in the store."""
    import numpy as np

    from mealkd.storage import create_store, open_store
    from mealkd.storage.schema import DENSE, busiest_rank_images, default_images_per_shard

    n = 1_281_167  # ImageNet
    assert default_images_per_shard(n, 100, 1000, DENSE, None) == default_images_per_shard(n, 100, 1000, DENSE, None, 8) == 1328
    # R = 8 on 64 GPUs: 79 shards (busiest rank 1.64x the mean) before; R = 100 already has 965 shards
    for r, processes, bound in ((8, 64, 1.01), (8, 8, 1.03), (100, 64, 1.07)):
        ips = default_images_per_shard(n, r, 1000, DENSE, None, processes)
        shards = [min(ips, n - start) for start in range(0, n, ips)]
        assert ips % 16 == 0 and len(shards) >= 3.9 * processes
        assert busiest_rank_images(shards, processes) / (n / processes) < bound, (r, processes, ips)
    assert default_images_per_shard(120, 3, 1000, DENSE, None, 2) == 16  # 8 shards, not 1 of 128 images
    assert default_images_per_shard(120, 3, 3, DENSE, None, 2) == 1024  # never below the inner chunk
    url = str(tmp_path / "s.zarr")
    create_store(url, attributes={}, paths=[f"c/{i}.jpg" for i in range(120)], targets=np.zeros(120, np.int32),
                 sizes=np.full((120, 2), 8), crops_per_image=3, num_classes=1000, encoding="dense", processes=2)
    store = open_store(url, require_complete=False)
    assert store.images_per_shard == 16 and store.num_shards == 8
