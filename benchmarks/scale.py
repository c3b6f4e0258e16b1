"""An ImageNet-sized job on this machine (issue 11, benchmark 2): start-up, memory and I/O at N = 1,281,167.

    python benchmarks/scale.py [--work /tmp/mealkd-scale] [--images 1281167] [--classes 1000]
                               [--crops 16] [--small-crops 4] [--writer-prefix 1] [--json FILE]

What it builds (reused on a rerun: delete --work to rebuild):
  * ``WORK/train``: ``--images`` files in ``--classes`` class dirs (class_000 ...), each a HARD LINK to
    one of ``--sources`` small real JPEGs (``WORK/src``, random sizes 40..80 px): costs directory
    entries, not bytes or inodes. Image i (in the dataset's sorted order) links source i % S, so the
    decoded size of every image is known without decoding it.
  * ``WORK/train_small``: 2 images per class (the same 1000 classes): the baseline for "RSS growth".
  * ``WORK/r16.zarr`` / ``WORK/r4.zarr`` (and ``WORK/small_r16.zarr``): topk:10 stores written by
    ``StoreWriter`` with the attributes precompute writes (class names, crop policy, dataset
    fingerprint from ``scan_image_folder``, decoder record, ...), true decoded sizes, windows from
    ``draw_all_windows`` (R = 4 reuses crops 0..3 of the R = 16 draws: a crop's window does not
    depend on how many are drawn), synthetic label rows (teachers are not measured). The first
    ``--writer-prefix`` shards go through ``write_shard`` (dense float32 rows: validation, top-k
    encoding, fidelity, fsync) to measure the writer's rate; the rest through
    ``write_shard_encoded`` with the same rows pre-encoded (a bank of 4096 softmax rows), because
    encoding 20.5M dense rows would take longer than the benchmark's budget on 2 shared cores.

What it measures (each in a fresh process; the load average is recorded beside each):
  * distill start: ``cli.py distill --epochs 1`` with a tiny TorchScript student, killed at its first
    training step (``MEALKD_TEST_KILL_AT=distill-step:1``); wall time from launch to the kill, at
    world 1 and at world 4 (``torch.distributed.run --standalone``, gloo on CPU). Peak RSS of every
    rank process (VmHWM from /proc, sampled every 50 ms); the same run on ``train_small`` gives the
    per-rank baseline, so growth = peak(full) - peak(small). Also the parts in this process: scan +
    fingerprint (warm page cache) and ``open_store``.
  * labels + windows read per epoch and rank: the loader's reads (``slot_crops`` + ``slot_encoded``
    of slot 0 for rank 0's images) in a fresh process, bytes from /proc/self/io rchar.
  * ``cli.py inspect`` and ``cli.py verify`` (integrity only) wall time, and ``cli.py --version`` (the
    interpreter + click start-up floor).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import child_pids, tiny_student_file  # noqa: E402 - benchmarks/ is sys.path[0]
PY = sys.executable
BANK = 4096


def load() -> float:
    return round(os.getloadavg()[0], 2)


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ tree
def build_sources(work: Path, count: int) -> np.ndarray:
    from PIL import Image

    from tests.datagen import smooth_image

    src = work / "src"
    sizes_file = work / "src_sizes.npy"
    if sizes_file.exists() and len(np.load(sizes_file)) == count:
        return np.load(sizes_file)
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = rng.integers(40, 81, size=(count, 2)).astype(np.int32)
    for i, (h, w) in enumerate(sizes.tolist()):
        Image.fromarray(smooth_image(rng, h, w)).save(src / f"src_{i:05d}.jpg", quality=85)
    np.save(sizes_file, sizes)
    return sizes


def build_tree(root: Path, src: Path, n_images: int, classes: int, n_src: int) -> float:
    """root/class_XXX/img_<global id>.jpg, hard links; returns seconds (0 when reused)."""
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == f"{n_images} {classes} {n_src}":
        return 0.0
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    base, extra = divmod(n_images, classes)
    i = 0
    sources = [str(src / f"src_{s:05d}.jpg") for s in range(n_src)]
    for c in range(classes):
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True)
        ds = str(d)
        for _ in range(base + (c < extra)):
            os.link(sources[i % n_src], f"{ds}/img_{i:07d}.jpg")
            i += 1
    marker.write_text(f"{n_images} {classes} {n_src}")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ stores
def label_bank(classes: int, k: int):
    from mealkd.storage.encoding import decode_topk, encode_topk
    from mealkd.storage.schema import topk_index_dtype

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((BANK, classes)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    idx, val = encode_topk(probs, k, topk_index_dtype(classes))
    tv = 0.5 * np.abs(probs - decode_topk(idx, val, classes)).sum(axis=1).astype(np.float64)
    return probs, idx, val, tv


def attributes(index, policy) -> dict:
    from mealkd.core.dali_io import decoder_record, resolve_backend

    return json.loads(json.dumps({
        "class_names": index.class_names,
        "crop": policy.to_dict(),
        "teachers": [{"spec": "synthetic rows (benchmarks/scale.py: teachers are not measured)"}],
        "temperature": 1.0,
        "precision": "fp32",
        "dataset": {"num_images": len(index), "fingerprint": index.fingerprint},
        "decoder": decoder_record(resolve_backend("cpu")),
        "encoding_request": "topk:10",
    }))


def write_stores(specs: list[tuple[Path, int]], tree: Path, src_sizes: np.ndarray, image_size: int, prefix: int) -> dict:
    """Create and fill the stores ``specs`` = [(url, R), ...] over ``tree`` (R's descending: the
    first R's windows are drawn, the others reuse their first crops). Returns timings."""
    from mealkd import storage
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.windows import CropPolicy, draw_all_windows

    todo = [(url, r) for url, r in specs if not (storage.store_exists(str(url)) and storage.open_store(str(url), require_complete=False, check_files=False).attrs.get("completed"))]
    if not todo:
        return {}
    for url, _ in todo:
        if url.exists():
            shutil.rmtree(url)
    out: dict = {}
    started = time.perf_counter()
    index = scan_image_folder(tree)
    out["scan_s"] = time.perf_counter() - started
    n = len(index)
    ids = np.array([int(p.rsplit("_", 1)[1][:-4]) for p in index.paths])
    assert (ids == np.arange(n)).all(), "sorted order must be the build order"
    sizes = src_sizes[np.arange(n) % len(src_sizes)]
    policy = CropPolicy(image_size=image_size)
    attrs = attributes(index, policy)
    probs_bank, idx_bank, val_bank, tv_bank = label_bank(len(index.class_names), 10)
    r_max = max(r for _, r in todo)
    windows_all = np.zeros((n, r_max, 4), np.int32)
    flips_all = np.zeros((n, r_max), bool)
    drawn = np.zeros(n, bool)
    for url, r in sorted(todo, key=lambda t: -t[1]):
        storage.create_store(str(url), attributes=attrs, paths=index.paths, targets=index.targets, sizes=sizes,
                             crops_per_image=r, num_classes=len(index.class_names), encoding="topk:10")
        writer = storage.StoreWriter(str(url))
        t_draw = t_write = t_dense = 0.0
        dense_rows = 0
        for shard in writer.pending_shards():
            lo, hi = writer.shard_range(shard)
            if not drawn[lo:hi].all():
                t = time.perf_counter()
                windows_all[lo:hi], flips_all[lo:hi] = draw_all_windows(policy, np.arange(lo, hi), sizes[lo:hi], r_max)
                drawn[lo:hi] = True
                t_draw += time.perf_counter() - t
            windows, flips = windows_all[lo:hi, :r], flips_all[lo:hi, :r]
            # (n, R) bank row per crop, drawn at random: a periodic choice would make the label chunks
            # unrealistically compressible (and differently so for each R)
            rows = np.random.default_rng([r, shard]).integers(0, BANK, size=(hi - lo, r))
            t = time.perf_counter()
            if shard < prefix:
                writer.write_shard(shard, windows, flips, probs_bank[rows])
                t_dense += time.perf_counter() - t
                dense_rows += rows.size
            else:
                tv = tv_bank[rows]
                writer.write_shard_encoded(shard, windows, flips, [idx_bank[rows], val_bank[rows]],
                                           fidelity=(float(tv.sum()), float(tv.max()), int(tv.size)))
                t_write += time.perf_counter() - t
        assert writer.finalize(), f"{url} incomplete"
        out[f"r{r}"] = {"shards": writer.num_shards, "images_per_shard": writer.images_per_shard, "draw_windows_s": t_draw,
                        "write_shard_dense_rows": dense_rows, "write_shard_dense_s": t_dense,
                        "write_shard_rows_per_s": dense_rows / t_dense if t_dense else None, "write_encoded_s": t_write}
        log(f"{url.name}: {out[f'r{r}']}")
    return out


# ------------------------------------------------------------------------------------------------ distill start
def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def is_rank(pid: int) -> bool:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return False
    return b"cli.py" in cmd and b"distill" in cmd and b"torch.distributed.run" not in cmd


def distill_start(work: Path, tree: Path, store: Path, world: int, student: str, image_size: int, tag: str) -> dict:
    run = work / "runs" / tag
    if run.exists():
        shutil.rmtree(run)
    args = ["cli.py", "distill", "--labels", str(store), "--data", str(tree), "--student", student, "--init", "pretrained",
            "--out", str(run), "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--image-size", str(image_size),
            "--num-threads", "1", "--log-every", "1"]
    cmd = [PY, *args] if world == 1 else [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args]
    env = dict(os.environ, MEALKD_TEST_KILL_AT="distill-step:1", OMP_NUM_THREADS="1")
    peaks: dict[int, int] = {}
    load_before = load()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            # the ranks: the process itself (world 1) or torchrun's direct children (not their forks)
            for pid in [proc.pid] if world == 1 else child_pids(proc.pid):
                if is_rank(pid):
                    hwm = status_kb(pid, "VmHWM")
                    if hwm:
                        peaks[pid] = max(peaks.get(pid, 0), hwm)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    thread.join()
    text = output.decode(errors="replace")
    killed = proc.returncode in (-9, 137) or "Signals.SIGKILL" in text or "exitcode  : -9" in text
    if not killed:
        print(text[-3000:])
    return {"world": world, "store": store.name, "tree": tree.name, "wall_s": wall, "killed_at_step_1": killed, "rc": proc.returncode,
            "peak_rss_mib_per_rank": sorted(round(v / 1024) for v in peaks.values()), "load_before": load_before, "load_after": load()}


# ------------------------------------------------------------------------------------------------ reads
READ_SNIPPET = r"""
import json, sys, time
import numpy as np
from mealkd import storage
def rchar():
    for line in open('/proc/self/io'):
        if line.startswith('rchar:'):
            return int(line.split()[1])
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
url, world = sys.argv[1], int(sys.argv[2])
store = storage.open_store(url)
usable = np.flatnonzero(~np.asarray(store.excluded, bool))
order = np.random.default_rng([0, 0]).permutation(usable)  # the loader's epoch-0 order (seed 0)
per_rank = -(-len(order) // world)
ids = np.resize(order, per_rank * world)[0::world]  # rank 0
h0, b0, t0 = hwm(), rchar(), time.perf_counter()
w, f = store.slot_crops(0, ids)
b1, t1 = rchar(), time.perf_counter()
labels = store.slot_encoded(0, ids)
b2, t2 = rchar(), time.perf_counter()
print(json.dumps({"images": int(len(ids)), "peak_rss_growth_bytes": hwm() - h0, "windows_flips_bytes": b1 - b0, "windows_flips_s": t1 - t0,
                  "labels_bytes": b2 - b1, "labels_s": t2 - t1, "held_bytes": int(w.nbytes + f.nbytes + sum(a.nbytes for a in labels))}))
"""


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def epoch_reads(store: Path, world: int) -> dict:
    out = subprocess.run([PY, "-c", READ_SNIPPET, str(store), str(world)], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(store=store.name, world=world, windows_on_disk=du(store / "windows"), flips_on_disk=du(store / "flips"),
                  labels_on_disk=du(store / "topk_idx") + du(store / "topk_val"), load=load())
    return result


def timed_cli(*args: str) -> dict:
    load_before = load()
    started = time.perf_counter()
    proc = subprocess.run([PY, "cli.py", *args], cwd=REPO, capture_output=True, text=True)
    return {"cmd": " ".join(args[:1]), "wall_s": time.perf_counter() - started, "rc": proc.returncode,
            "tail": (proc.stdout + proc.stderr)[-400:], "load_before": load_before, "load_after": load()}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mealkd-scale")
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=2000)
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--small-crops", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--writer-prefix", type=int, default=1, help="shards written through write_shard (dense rows)")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: start,reads,inspect,verify")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"), "load_start": os.getloadavg()}}

    src_sizes = build_sources(work, args.sources)
    tree, small = work / "train", work / "train_small"
    res["tree_build_s"] = build_tree(tree, work / "src", args.images, args.classes, args.sources)
    build_tree(small, work / "src", 2 * args.classes, args.classes, args.sources)
    log(f"tree ready ({res['tree_build_s']:.0f} s to build; 0 = reused)")
    r_big, r_small = work / f"r{args.crops}.zarr", work / f"r{args.small_crops}.zarr"
    res["stores"] = write_stores([(r_big, args.crops), (r_small, args.small_crops)], tree, src_sizes, args.image_size, args.writer_prefix)
    write_stores([(work / f"small_r{args.crops}.zarr", args.crops)], small, src_sizes, args.image_size, 0)
    log("stores ready")

    # the parts of the start this process can time alone (page cache warm: the tree was just scanned)
    from mealkd import storage
    from mealkd.core.dataset import scan_image_folder

    t = time.perf_counter()
    index = scan_image_folder(tree)
    res["scan_fingerprint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    storage.open_store(str(r_big), fingerprint=index.fingerprint, class_names=index.class_names)
    res["open_store_s"] = time.perf_counter() - t
    res["scan_load"] = load()
    del index
    log(f"scan {res['scan_fingerprint_s']:.1f} s, open {res['open_store_s']:.2f} s")

    student = str(tiny_student_file(work, args.classes))
    if "start" not in skip:
        res["start"] = []
        small_store = work / f"small_r{args.crops}.zarr"
        # the R pair at world 4 twice, interleaved (the machine is shared: one pair alone is noisy)
        for tree_, store_, world, tag in ((tree, r_big, 1, "w1_r16"), (tree, r_big, 4, "w4_r16"), (tree, r_small, 4, "w4_r4"),
                                          (small, small_store, 4, "w4_small"), (tree, r_big, 4, "w4_r16"), (tree, r_small, 4, "w4_r4"),
                                          (small, small_store, 4, "w4_small"), (small, small_store, 1, "w1_small")):
            res["start"].append(dict(distill_start(work, tree_, store_, world, student, args.image_size, tag), tag=tag))
            log(f"start {res['start'][-1]}")
    if "reads" not in skip:
        res["reads"] = [epoch_reads(s, w) for s in (r_big, r_small) for w in (1, 4)]
        for r in res["reads"]:
            log(f"reads {r}")
    res["cli_floor"] = timed_cli("--version")
    if "inspect" not in skip:
        res["inspect"] = timed_cli("inspect", str(r_big))
        log(f"inspect {res['inspect']['wall_s']:.2f} s")
    if "verify" not in skip:
        res["verify"] = timed_cli("verify", str(r_big))
        log(f"verify {res['verify']['wall_s']:.1f} s rc {res['verify']['rc']}")
    res["machine"]["load_end"] = os.getloadavg()
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
