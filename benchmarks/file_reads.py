"""Who reads the image files: the Python feed thread (``np.fromfile`` per file, the bytes fed to DALI) or
DALI's own threads (``core.replay.read_files``: the paths fed, ``fn.io.file.read``). Run by hand; CPU is enough.

On a GPU the training thread is a busy Python thread (it launches the model's kernels) and the feeds are
built by a second Python thread. Every ``np.fromfile`` releases the GIL for its read and must take it
back, and next to a busy thread each retake can wait for the interpreter's switch interval (5 ms): the
"convoy effect". Measured in one run, both ways, on the same files:

* feed: the feed thread's time per batch, alone;
* feeds under a busy thread: feeds/s the feed thread builds while this thread runs pure Python;
* loader with a busy consumer: images/s of the whole loop (feeds in a background thread, DALI decodes,
  the consumer spends ``--step-ms`` of pure Python per batch, as a kernel-launching thread does);
* the decoded pixels of both ways are compared (they must be equal).

    PYTHONPATH=. python benchmarks/file_reads.py [--images 512] [--batch 128] [--threads 2] [--step-ms 20]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from nvidia.dali import fn, types
from PIL import Image

from mealkd.core.dali_io import background, build_pipeline, resolve_backend, run_batches
from mealkd.core.dataset import DatasetIndex, scan_image_folder
from mealkd.core.replay import FILES, decode_image, read_files


def make_tree(root: Path, images: int, seed: int = 0) -> Path:
    """JPEGs of 300-500 px a side (ImageNet-like sizes, ~40-110 KB at quality 90), 4 classes."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(300, 501, size=2)
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w]
        noise = rng.integers(-20, 21, size=pixels.shape)
        Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)
    return root


def bytes_graph():
    """The previous way (the baseline): the files' bytes, read by the feed thread, fed as ``encoded``."""
    return decode_image(fn.external_source(name="encoded", dtype=types.UINT8, batch=True), "cpu")


def paths_graph():
    return decode_image(read_files(), "cpu")


def bytes_feeds(index: DatasetIndex, batch: int):
    return ({"encoded": [index.read_bytes(i) for i in range(s, min(s + batch, len(index)))]} for s in range(0, len(index), batch))


def path_feeds(index: DatasetIndex, batch: int):
    return ({FILES: index.file_feed(range(s, min(s + batch, len(index))))} for s in range(0, len(index), batch))


def spin(seconds: float) -> None:
    """Pure Python for ``seconds`` (holds the GIL but for the interpreter's switches)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1


def feed_ms(make, index: DatasetIndex, batch: int) -> float:
    started, n = time.perf_counter(), 0
    for _ in make(index, batch):
        n += 1
    return (time.perf_counter() - started) / n * 1e3


def feeds_under_busy_thread(make, index: DatasetIndex, batch: int, seconds: float = 2.0) -> float:
    stop, built = threading.Event(), [0]

    def feeder() -> None:
        while not stop.is_set():
            for _ in make(index, batch):
                built[0] += 1
                if stop.is_set():
                    break

    thread = threading.Thread(target=feeder)
    thread.start()
    spin(seconds)
    stop.set()
    thread.join()
    return built[0] / seconds


def loader_rate(graph, make, index: DatasetIndex, batch: int, threads: int, step_s: float, epochs: int = 2) -> float:
    """images/s of whole epochs: feeds built in a background thread, DALI decoding, and a consumer that
    spends ``step_s`` of pure Python per batch."""
    pipe = build_pipeline(graph, batch_size=batch, backend=resolve_backend("cpu"), num_threads=threads)
    images, started = 0, time.perf_counter()
    for _ in range(epochs):
        for n in run_batches(pipe, background(make(index, batch), 2), lambda outs: len(outs[0])):
            spin(step_s)
            images += n
    return images / (time.perf_counter() - started)


def decoded(graph, make, index: DatasetIndex, batch: int) -> list[np.ndarray]:
    pipe = build_pipeline(graph, batch_size=batch, backend=resolve_backend("cpu"), num_threads=2)
    return [x for b in run_batches(pipe, make(index, batch), lambda outs: [np.array(outs[0][i]) for i in range(len(outs[0]))]) for x in b]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--step-ms", type=float, default=20.0, help="pure-Python milliseconds the consumer spends per batch")
    parser.add_argument("--work", default=None, help="where to write the JPEG tree (default: a temporary directory)")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mealkd-file-reads-") as tmp:
        root = Path(ns.work) if ns.work else Path(tmp)
        if not (root / "train").exists():
            make_tree(root / "train", ns.images)
        index = scan_image_folder(root / "train")
        mean_kb = float(np.mean(index.byte_sizes)) / 1e3
        print(f"{len(index)} JPEGs, mean {mean_kb:.0f} KB; batch {ns.batch}; {ns.threads} DALI threads; consumer step {ns.step_ms:g} ms of "
              f"pure Python; switch interval {1e3 * __import__('sys').getswitchinterval():g} ms; {os.cpu_count()} cores")
        ways = {"bytes read by the feed thread (before)": (bytes_graph, bytes_feeds), "paths, read by DALI (read_files)": (paths_graph, path_feeds)}
        same = all(np.array_equal(a, b) for a, b in zip(decoded(*ways["bytes read by the feed thread (before)"], index, ns.batch),
                                                       decoded(*ways["paths, read by DALI (read_files)"], index, ns.batch)))
        print(f"decoded pixels equal both ways: {same}")
        rows = {name: {"feed": [], "busy": [], "loader": []} for name in ways}
        for _ in range(2):  # interleaved
            for name, (graph, make) in ways.items():
                rows[name]["feed"].append(feed_ms(make, index, ns.batch))
                rows[name]["busy"].append(feeds_under_busy_thread(make, index, ns.batch))
                rows[name]["loader"].append(loader_rate(graph, make, index, ns.batch, ns.threads, ns.step_ms / 1e3))
        base = max(rows["bytes read by the feed thread (before)"]["loader"])
        for name, r in rows.items():
            print(f"{name:>40}: feed {min(r['feed']):.2f} ms/batch alone; {max(r['busy']):.1f} feeds/s next to a busy thread; "
                  f"loader with a busy consumer {max(r['loader']):.0f} images/s ({max(r['loader']) / base:.2f}x)")
        print(f"(a consumer alone, never waiting: {ns.batch / (ns.step_ms / 1e3):.0f} images/s)")


if __name__ == "__main__":
    main()
