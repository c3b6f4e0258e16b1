"""Kill anywhere: SIGKILL `precompute` and `distill` at random moments, rerun until done, and get exactly
the result of an uninterrupted run (docs/architecture.md, section 8).

Kill moments come from two sources:
* ``MEALKD_TEST_KILL_AT=point:n`` (mealkd/faults.py): the process SIGKILLs itself the n-th time
  it reaches a named point, n drawn at random: while creating the store (before its attributes),
  mid-shard (windows written, labels not), after a shard's data but before its ``done``, right
  after ``done``, during finalisation (before the ``completed`` attribute); in distill at a random
  training step and between the epoch's metrics line and its checkpoint.
* polling: the harness watches the store directory and SIGKILLs the moment a new label shard file
  appears (whatever the writer is doing then).
After every kill, each image marked done must hold exactly the reference run's labels.
The seed is random per run and printed on failure (set MEALKD_KILL_SEED to replay one).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import (
    assert_same_store, cli, distill_args, precompute_args, spawn, store_arrays, tiny_teacher,
)

SEED = int(os.environ.get("MEALKD_KILL_SEED", np.random.SeedSequence().entropy % 10**6))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    data = make_jpeg_tree(root / "data", classes=3, per_class=5, seed=3, min_side=24, max_side=40)  # 15 images, 8 shards
    teachers = f"{tiny_teacher(root / 't1.pt', seed=1)},{tiny_teacher(root / 't2.pt', seed=2)}:w=0.5"
    reference = spawn(*precompute_args(data, teachers, root / "ref.zarr"))  # uninterrupted; runs beside the kills

    def ref_store() -> Path:
        if reference.returncode is None:
            out = reference.communicate(timeout=300)
            assert reference.returncode == 0, out[1]
        assert reference.returncode == 0
        return root / "ref.zarr"

    return root, data, teachers, ref_store


def _pending(store: Path) -> int:
    if not (store / "zarr.json").exists():
        return 8
    try:
        done = store_arrays(store)["done"]
    except KeyError:
        return 8
    return int(np.count_nonzero(~done.reshape(-1)[: 14].reshape(7, 2).all(1))) + int(not done[14])


def _check_done_rows(store: Path, ref: dict) -> None:
    """Nothing is marked done that was not written: done images hold the reference labels."""
    try:
        got = store_arrays(store)
    except Exception:  # noqa: BLE001 - no store (or no attributes) yet: nothing can be done
        return
    if "done" not in got:
        return
    done = got["done"]
    for name in ("windows", "flips", "probs"):
        assert np.array_equal(got[name][done], ref[name][done]), f"{name} of a done image differs from the reference"


def _kill_on_new_shard(args: list[str], store: Path, timeout: float = 120) -> int:
    """Start precompute; SIGKILL it as soon as a new probs shard file appears. Returns its exit code."""
    probs = store / "probs" / "c"
    before = sum(1 for p in probs.rglob("*") if p.is_file()) if probs.exists() else 0
    proc = spawn(*args)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if probs.exists() and sum(1 for p in probs.rglob("*") if p.is_file() and ".partial" not in p.name) > before:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=timeout)
    return proc.returncode


def test_precompute_killed_anywhere_equals_uninterrupted(setup):
    root, data, teachers, reference = setup
    rng = np.random.default_rng(SEED)
    store = root / "killed.zarr"
    args = precompute_args(data, teachers, store)

    kills = 0
    plan = ["create-attrs:1", "shard-windows", "shard-before-done", "shard-done", "poll", "finalize:1"]
    outcomes = []
    ref_store = reference()
    ref = store_arrays(ref_store)
    for point in plan:
        if point == "poll":
            rc = _kill_on_new_shard(args, store)
        else:
            if ":" not in point:
                point = f"{point}:{rng.integers(1, min(3, _pending(store)) + 1)}"
            rc = cli(*args, kill_at=point).returncode
        outcomes.append((point, rc))
        kills += rc == -signal.SIGKILL
        _check_done_rows(store, ref)
    assert kills >= 5, f"seed {SEED}: {outcomes}"
    final = cli(*args)
    assert final.returncode == 0, f"seed {SEED}: {outcomes}\n{final.stderr}"
    assert "complete" in final.stderr
    assert_same_store(store, ref_store)


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_distill_killed_at_random_steps_resumes_identically(setup, tmp_path):
    root, data, teachers, reference_store = setup
    store = reference_store()
    rng = np.random.default_rng(SEED + 1)
    ref_run, run = tmp_path / "ref", tmp_path / "killed"
    reference = spawn(*distill_args(store, data, ref_run))
    # 15 images, batch 4 -> 4 steps per epoch, 2 epochs. Each run resumes from the last checkpoint,
    # and its step counter restarts at 1 there.
    plan = [
        f"distill-step:{rng.integers(1, 4)}",       # inside epoch 1, no checkpoint yet
        "distill-checkpoint:1",                      # epoch 1 trained and logged, checkpoint not written
        f"distill-step:{rng.integers(5, 8)}",       # epoch 1 checkpointed, killed inside epoch 2
        f"distill-step:{rng.integers(1, 4)}",       # resumed at epoch 2, killed inside it again
        "distill-checkpoint:1",                      # epoch 2 trained and logged, checkpoint not written
    ]
    outcomes = []
    for point in plan:
        rc = cli(*distill_args(store, data, run, "--resume"), kill_at=point).returncode
        outcomes.append((point, rc))
    assert [rc for _, rc in outcomes] == [-signal.SIGKILL] * 5, f"seed {SEED}: {outcomes}"
    final = cli(*distill_args(store, data, run, "--resume"))
    assert final.returncode == 0, final.stderr
    ref_out = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[1]
    got, want = _state(run), _state(ref_run)
    assert got["epoch"] == want["epoch"] == 2
    for part in ("model", "discriminator"):
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"seed {SEED}: {part}.{key} differs after kills + resume"
    for key, value in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"])
    assert (run / "metrics.jsonl").read_text().count("\n") == 2  # the killed epochs' lines were trimmed
    strip = lambda text: [line.split('"crops_per_s"')[0] for line in text.splitlines()]  # noqa: E731 - timings differ
    assert strip((run / "metrics.jsonl").read_text()) == strip((ref_run / "metrics.jsonl").read_text())


@pytest.mark.parametrize("sig", ["TERM", "USR1", "INT"])
def test_precompute_stop_signal_keeps_finished_shards_and_the_rerun_completes(setup, tmp_path, sig):
    """A stop signal (here right after shard 3 is marked done, on the writer thread) ends precompute with one
    line and exit 128 + signal; every shard marked done holds the reference labels, the store is not
    complete, and rerunning the same command completes a store equal to an uninterrupted run."""
    _, data, teachers, ref_store = setup
    store = tmp_path / "s.zarr"
    args = precompute_args(data, teachers, store)
    proc = spawn(*args, kill_at=f"shard-done:3:{sig}")
    _, err = proc.communicate(timeout=300)
    signum = getattr(signal, f"SIG{sig}")
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"precompute: stopped by SIG{sig};") and "rerun the same command" in last, last
    ref = store_arrays(ref_store())
    _check_done_rows(store, ref)
    assert 3 <= 8 - _pending(store) < 8  # shard 3 and any write already under way were kept; not complete
    rerun = spawn(*args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert_same_store(store, ref_store())
