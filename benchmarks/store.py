"""Label-store benchmark: size and read throughput of dense / top-k stores vs a raw fp16 memmap.

Data: N images x R crops x C classes of synthetic teacher-like softmax rows, generated per image
block with a fixed seed: logits = N(0, 1) over all classes (a long, uneven tail), plus U(6, 14) on
one "true" class (the image's class for 80% of crops, a random one otherwise) and U(1, 4) on three
"confusable" classes per image, then softmax. Mean top-1 probability ~0.75 and entropy ~1.7 nats
(printed below), in the range of an ImageNet teacher ensemble at temperature 1; not real output.

Measured (page cache warm for both store and memmap, single process):
* bytes/crop = bytes on disk / (N*R); TV = total-variation error of the stored rows vs the
  float32 originals (dense: fp16 rounding; top-k: decode with leftover mass spread uniformly);
* random: batches of 256 random (image, crop) -> LabelStore.labels; memmap: fancy indexing;
* slot: LabelStore.slot_labels(slot) over all images; memmap: mm[:, slot, :];
* each store is read twice: the raw-shard fast path (default for complete local stores) and
  zarr's own read path (``fast_path = False``: what fsspec URLs and incomplete stores use).
Both paths return float32 rows renormalised to sum to 1.

    .venv/bin/python benchmarks/store.py [--images 20000 --crops 8 --classes 1000 --dir /tmp/mealkd-bench]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:  # precompute/distill have torch imported; storage then uses its faster fp16 casts
    import torch  # noqa: F401
except ImportError:  # pragma: no cover
    pass
from mealkd import storage  # noqa: E402
from mealkd.storage.encoding import normalise_rows  # noqa: E402


def make_probs(n: int, r: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, r, c), np.float32)
    cls = rng.integers(0, c, n)
    near = rng.integers(0, c, (n, 3))
    for s in range(0, n, 512):
        b = min(512, n - s)
        logits = rng.standard_normal((b, r, c), dtype=np.float32)
        for j in range(3):
            logits[np.arange(b), :, near[s:s + b, j]] += rng.uniform(1, 4, (b, r)).astype(np.float32)
        peak = np.where(rng.random((b, r)) < 0.8, cls[s:s + b, None], rng.integers(0, c, (b, r)))
        np.put_along_axis(logits, peak[..., None], np.take_along_axis(logits, peak[..., None], -1)
                          + rng.uniform(6, 14, (b, r, 1)).astype(np.float32), -1)
        logits -= logits.max(-1, keepdims=True)
        e = np.exp(logits)
        out[s:s + b] = e / e.sum(-1, keepdims=True)
    return out


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--dir", default="/tmp/mealkd-bench")
    args = ap.parse_args()
    n, r, c = args.images, args.crops, args.classes
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    t = time.perf_counter()
    probs = make_probs(n, r, c, seed=0)
    ent = -(probs * np.log(np.maximum(probs, 1e-30))).sum(-1)
    print(f"# {n} images x {r} crops x {c} classes; generated in {time.perf_counter() - t:.1f}s; "
          f"mean top-1 {probs.max(-1).mean():.3f}, mean entropy {ent.mean():.3f} nats")
    print(f"# {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}")

    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, n, 256), rng.integers(0, r, 256)) for _ in range(args.batches)]

    # raw memmap fp16 baseline
    mm_path = root / "baseline.f16"
    mm = np.lib.format.open_memmap(mm_path, mode="w+", dtype=np.float16, shape=(n, r, c))
    mm[:] = probs
    mm.flush()
    mm = np.load(mm_path, mmap_mode="r")
    mm_rand = timeit(lambda: [normalise_rows(mm[i, j]) for i, j in batches], 2) / len(batches)
    mm_slot = timeit(lambda: normalise_rows(mm[:, 3, :]), 3)
    mm_bytes = mm_path.stat().st_size
    rows = [("raw memmap fp16 (baseline)", mm_bytes / (n * r), None, None, 256 / mm_rand, n / mm_slot, float("nan"))]

    for enc in ["dense", "topk:5", "topk:10", "topk:20"]:
        url = str(root / f"{enc.replace(':', '')}.zarr")
        kind, k = storage.parse_encoding(enc)
        storage.create_store(url, attributes={"class_names": [f"c{i}" for i in range(c)]}, paths=[f"{i}.jpg" for i in range(n)],
                             targets=np.zeros(n, np.int32), sizes=np.full((n, 2), 256, np.int32), crops_per_image=r,
                             num_classes=c, encoding=enc)
        w = storage.StoreWriter(url)
        windows = np.ones((n, r, 4), np.int32)
        flips = np.zeros((n, r), bool)
        t = time.perf_counter()
        for s in w.pending_shards():
            a, b = w.shard_range(s)
            w.write_shard(s, windows[a:b], flips[a:b], probs[a:b])
        write_s = time.perf_counter() - t
        assert w.finalize()
        st = storage.open_store(url)
        if kind == "dense-f16":
            sample = np.arange(0, n, 10)
            tvs = 0.5 * np.abs(st.slot_labels(0, sample) - probs[sample, 0]).sum(-1)
            mean_tv, max_tv = float(tvs.mean()), float(tvs.max())
        else:
            mean_tv, max_tv = st.attrs["fidelity"]["mean_tv"], st.attrs["fidelity"]["max_tv"]
        st.fast_path = True  # storage.rawshard (complete local store)
        rand = timeit(lambda: [st.labels(i, j) for i, j in batches], 1) / len(batches)
        slot = timeit(lambda: st.slot_labels(3), 2)
        st.fast_path = False  # zarr's own read path (what an fsspec URL or incomplete store gets)
        zrand = timeit(lambda: [st.labels(i, j) for i, j in batches[:10]], 1) / 10
        zslot = timeit(lambda: st.slot_labels(3), 1)
        nbytes = st.nbytes_on_disk()
        label_arrays = " ".join(f"{a.basename}: chunks {a.chunks} shards {a.shards}" for a in st._label_arrays)
        print(f"# {enc}: images_per_shard {st.images_per_shard}, {label_arrays}; write {n * r / write_s:,.0f} crops/s")
        rows.append((f"zarr {enc}", nbytes / (n * r), mean_tv, max_tv, 256 / rand, n / slot, write_s))
        rows.append((f"zarr {enc}, zarr read path", None, None, None, 256 / zrand, n / zslot, float("nan")))

    print()
    print("| store | bytes/crop | mean TV | max TV | random 256-batch crops/s (x memmap) | slot-contiguous crops/s (x memmap) | write s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, bpc, mtv, xtv, rnd, slt, ws in rows:
        f = (lambda v: "-" if v is None else f"{v:.5f}")
        print(f"| {name} | {'' if bpc is None else f'{bpc:,.1f}'} | {f(mtv)} | {f(xtv)} | {rnd:,.0f} ({rnd / rows[0][4]:.3f}x) | "
              f"{slt:,.0f} ({slt / rows[0][5]:.2f}x) | {'-' if ws != ws else f'{ws:.1f}'} |")


if __name__ == "__main__":
    main()
