"""Label store under several OS processes: concurrent disjoint writers, and a writer SIGKILLed
mid-write followed by a resume. Run as a script, this file is the writer child process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N, R, C, IPS = 480, 4, 300, 12  # 40 shards of ~58 KB float32 input each


def shard_data(shard: int):
    """Deterministic (windows, flips, probs) for one shard, identical in every process."""
    start, stop = shard * IPS, min((shard + 1) * IPS, N)
    rng = np.random.default_rng(1000 + shard)
    n = stop - start
    windows = rng.integers(0, 1000, (n, R, 4)).astype(np.int32)
    flips = rng.random((n, R)) < 0.5
    logits = rng.standard_normal((n, R, C)).astype(np.float32) * 3
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return windows, flips, (e / e.sum(-1, keepdims=True)).astype(np.float32)


def create(url: str, encoding: str) -> None:
    from mealkd import storage
    storage.create_store(url, attributes={"class_names": [f"c{i}" for i in range(C)], "dataset": {"num_images": N, "fingerprint": "f"}},
                         paths=[f"{i}.jpg" for i in range(N)], targets=np.arange(N) % C, sizes=np.full((N, 2), 64),
                         crops_per_image=R, num_classes=C, encoding=encoding, images_per_shard=IPS)


def child(url: str, rank: int, world: int, repeat: int) -> None:
    """Write this rank's shards (``repeat`` passes), reporting each one on stdout."""
    from mealkd import storage
    w = storage.StoreWriter(url)
    shards = [s for s in range(w.num_shards) if s % world == rank]
    data = {s: shard_data(s) for s in shards}
    print("ready", flush=True)
    for _ in range(repeat):
        for s in shards:
            t = time.perf_counter()
            w.write_shard(s, *data[s])
            print(f"wrote {s} {time.perf_counter() - t:.6f}", flush=True)


def spawn(url: str, rank: int, world: int, repeat: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, url, str(rank), str(world), str(repeat)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fill_all(url: str) -> None:
    from mealkd import storage
    w = storage.StoreWriter(url)
    for s in w.pending_shards():
        w.write_shard(s, *shard_data(s))
    assert w.finalize()


def label_arrays(url: str) -> dict:
    import zarr

    g = zarr.open_group(url, mode="r")
    return {name: g[name][:] for name in ("windows", "flips", "done", "probs", "topk_idx", "topk_val", "fidelity") if name in g}


def file_bytes(url: str) -> dict:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".partial") and p.relative_to(root) != Path("zarr.json")}


def expected_rows(store_url: str):
    windows, flips, probs = map(np.concatenate, zip(*(shard_data(s) for s in range(-(-N // IPS)))))
    return windows, flips, probs


def test_two_processes_write_disjoint_shards(tmp_path):
    from mealkd import storage
    from mealkd.storage.encoding import normalise_rows

    url = str(tmp_path / "two.zarr")
    create(url, "dense")
    procs = [spawn(url, rank, 2) for rank in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.count("wrote") == 20
    w = storage.StoreWriter(url)
    assert w.pending_shards() == [] and w.finalize()
    st = storage.open_store(url)
    windows, flips, probs = expected_rows(url)
    np.testing.assert_array_equal(st.windows, windows)
    np.testing.assert_array_equal(st.flips, flips)
    for slot in range(R):
        np.testing.assert_array_equal(st.slot_labels(slot), normalise_rows(probs[:, slot].astype(np.float16)))
    # and byte-identical to one process writing everything
    ref = str(tmp_path / "one.zarr")
    create(ref, "dense")
    fill_all(ref)
    assert file_bytes(url) == file_bytes(ref)


def _kill_mid_write(url: str, after: int, fraction: float = 0.5) -> int:
    """Start a writer that loops over all shards; after it reports shard ``after``, wait half its
    median write_shard time (so it is in the middle of the next write_shard) and SIGKILL it.
    Returns how many shards it reported (``fraction`` of the median instead of half, if given)."""
    proc = spawn(url, 0, 1, repeat=1)
    assert proc.stdout.readline().strip() == "ready"
    seen, durations = 0, []
    while seen <= after:
        line = proc.stdout.readline()
        assert line.startswith("wrote"), (line, proc.stderr.read() if proc.poll() is not None else "")
        durations.append(float(line.split()[2]))
        seen += 1
    time.sleep(fraction * float(np.median(durations)))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return seen


def _check_done_means_written(url: str) -> np.ndarray:
    """Every image marked done has exactly the expected windows/flips/labels."""
    arrays = label_arrays(url)
    windows, flips, probs = expected_rows(url)
    done = arrays["done"]
    np.testing.assert_array_equal(arrays["windows"][done], windows[done])
    np.testing.assert_array_equal(arrays["flips"][done], flips[done])
    if "probs" in arrays:
        np.testing.assert_array_equal(arrays["probs"][done], probs[done].astype(np.float16))
    else:
        from mealkd.storage.encoding import encode_topk

        idx, val = encode_topk(probs[done], arrays["topk_idx"].shape[-1], np.uint16)
        np.testing.assert_array_equal(arrays["topk_idx"][done], idx)
        np.testing.assert_array_equal(arrays["topk_val"][done], val)
    return done


def _interrupted_shard_files(url: str, shard: int) -> list[str]:
    """Files of a not-done shard (or temp files) on disk: evidence that a kill landed mid-write."""
    root = Path(url)
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and (
        p.name.endswith(".partial") or p.relative_to(root).parts[1:3] == ("c", str(shard)))]


def _sigkill_then_resume(tmp_path, encoding: str) -> None:
    from mealkd import storage
    url = str(tmp_path / "killed.zarr")
    create(url, encoding)
    seen = _kill_mid_write(url, after=5)
    done = _check_done_means_written(url)
    w = storage.StoreWriter(url)
    pending = w.pending_shards()
    # one writer in shard order, killed before the end: done shards are a prefix (at least the
    # reported ones), the rest (the interrupted one included) is pending
    assert pending and pending == list(range(pending[0], 40)) and pending[0] >= seen, (seen, pending)
    assert done[: pending[0] * IPS].all() and not done[pending[0] * IPS:].any()
    assert w.finalize() is False
    print("kill landed mid-write:", _interrupted_shard_files(url, pending[0]))
    for s in pending:
        w.write_shard(s, *shard_data(s))
    assert w.finalize()
    ref = str(tmp_path / "clean.zarr")
    create(ref, encoding)
    fill_all(ref)
    a, b = label_arrays(url), label_arrays(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert file_bytes(url) == file_bytes(ref)
    storage.open_store(url)


def test_sigkill_mid_write_then_resume_dense(tmp_path):
    _sigkill_then_resume(tmp_path, "dense")


def test_sigkill_mid_write_then_resume_topk(tmp_path):
    _sigkill_then_resume(tmp_path, "topk:7")


def test_sigkill_at_many_points_never_marks_unwritten_done(tmp_path):
    """Kill fresh writers at several points of a write; done always implies written, and at least
    one kill demonstrably landed while a shard was half on disk (its files there, done False)."""
    from mealkd import storage
    landed = []
    for attempt, (after, fraction) in enumerate([(0, 0.3), (2, 0.5), (4, 0.7), (3, 0.2), (5, 0.9)]):
        url = str(tmp_path / f"k{attempt}.zarr")
        create(url, "dense")
        _kill_mid_write(url, after, fraction)
        done = _check_done_means_written(url)
        pending = storage.StoreWriter(url).pending_shards()
        first = pending[0]
        assert pending == list(range(first, 40)) and done[: first * IPS].all() and not done[first * IPS:].any()
        landed.append(bool(_interrupted_shard_files(url, first)))
    assert any(landed), landed
    w = storage.StoreWriter(url)
    for s in w.pending_shards():
        w.write_shard(s, *shard_data(s))
    assert w.finalize()
    _check_done_means_written(url)
    assert storage.open_store(url).done.all()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))


def test_a_writer_removes_the_partial_files_a_killed_writer_left(tmp_path):
    """zarr's LocalStore writes '<key>.<uuid>.partial' and renames it: a SIGKILL can leave one, which no rerun
    removed (inspect counted its bytes). The store lock's holder removes them: no write is in flight then."""
    from mealkd.precompute.lock import StoreLock

    from mealkd import storage

    url = str(tmp_path / "s.zarr")
    create(url, "dense")
    stray = tmp_path / "s.zarr" / "done" / "c" / "0.1234abcd.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a chunk")
    with StoreLock(url):
        assert not stray.exists()
    assert storage.open_store(url, require_complete=False).num_images == N
