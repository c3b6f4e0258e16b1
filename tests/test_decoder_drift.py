"""A store begun under one decoder and continued under another (issue 10, defect 4, for the writers).

A long precompute resumed on other nodes or in an updated container meets a store whose ``decoder``
record names another DALI version or GPU model. Real stores on disk, real precompute / extend /
merge runs (DALI on CPU, TorchScript teachers); the "other decoder" is the store's recorded DALI
version edited to one this machine does not have, as a store made elsewhere would record it.

* continuing is refused with one line naming the field and ``--allow-decoder-mismatch``, the store
  untouched; with the flag the run finishes, the store keeps its original record and lists the
  continuing decoder once in ``decoder_drift`` (``inspect`` shows it);
* another backend (a GPU-made store continued on the CPU) is refused even with the flag;
* a complete store reruns as a no-op whatever the decoder (nothing is decoded);
* ``extend`` and ``merge`` carry and add drift entries the same way.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_reliability_common import assert_user_error, precompute_args, run, store_arrays, tiny_world

ELSEWHERE = "1.0.0-elsewhere"  # a DALI version this machine does not have


def _zarr_group(url: Path):
    import zarr

    return zarr.open_group(str(url), mode="r+")


def _begun_elsewhere(ref: Path, out: Path, *, done_shards: int | None = 2, **decoder) -> Path:
    """A copy of the finished store ``ref`` whose decoder record says ``decoder`` (e.g. another DALI
    version) and, with ``done_shards``, only that many shards done: what a run made elsewhere and
    stopped leaves (``done`` is the store's single source of truth; the later shards' files are
    ignored until rewritten)."""
    shutil.copytree(ref, out)
    group = _zarr_group(out)
    group.attrs["decoder"] = dict(group.attrs["decoder"], **decoder)
    if done_shards is not None:
        per_shard = int(group.attrs["images_per_shard"])
        done = np.asarray(group["done"][:], bool)
        done[done_shards * per_shard:] = False
        group["done"][:] = done
        if "completed" in group.attrs:
            del group.attrs["completed"]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    data, teachers = tiny_world(root, seed=11)
    ref = root / "ref.zarr"
    return {"root": root, "data": data, "teachers": teachers, "ref": ref}


def _make_ref(world, capsys) -> Path:
    if not world["ref"].exists():
        proc = run(capsys, *precompute_args(world["data"], world["teachers"], world["ref"]))
        assert proc.returncode == 0, proc.stderr
    return world["ref"]


def test_precompute_continues_another_decoder_only_when_accepted_and_records_it(world, capsys, tmp_path):
    import nvidia.dali

    ref = _make_ref(world, capsys)
    out = _begun_elsewhere(ref, tmp_path / "partial.zarr", dali_version=ELSEWHERE)
    args = precompute_args(world["data"], world["teachers"], out)
    done_before = np.asarray(_zarr_group(out)["done"][:], bool).copy()

    assert_user_error(run(capsys, *args), f"--out {out}", f"dali_version '{ELSEWHERE}' in the store", "--allow-decoder-mismatch")
    assert np.array_equal(np.asarray(_zarr_group(out)["done"][:], bool), done_before)  # nothing labelled
    assert "decoder_drift" not in _zarr_group(out).attrs

    proc = run(capsys, *args, "--allow-decoder-mismatch")
    assert proc.returncode == 0, proc.stderr
    assert "differing: dali_version" in proc.stderr
    assert "precompute: 5 images x 3 crops = 15 crops to label by 1 process(es)" in proc.stderr  # its start line
    assert "(continuing: 3 of 5 shards pending)" in proc.stderr
    assert np.asarray(_zarr_group(out)["done"][:], bool).all() and "completed" in _zarr_group(out).attrs
    got, want = store_arrays(out), store_arrays(ref)  # the same CPU decoder in fact: the labels of an uninterrupted run
    assert all(np.array_equal(got[name], want[name]) for name in want)
    attrs = _zarr_group(out).attrs.asdict()
    assert attrs["decoder"]["dali_version"] == ELSEWHERE  # the record of the store's first crops is kept
    [entry] = attrs["decoder_drift"]
    assert entry["decoder"] == {"backend": "cpu", "dali_version": nvidia.dali.__version__}
    assert entry["fields"] == ["dali_version"] and entry["command"] == "precompute" and entry["at"]

    # complete now: a rerun decodes nothing, so it needs no flag and records nothing more
    proc = run(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    proc = run(capsys, *args, "--allow-decoder-mismatch")
    assert proc.returncode == 0 and len(_zarr_group(out).attrs["decoder_drift"]) == 1

    proc = run(capsys, "inspect", str(out))
    assert proc.returncode == 0 and "decoder drift" in proc.stdout and nvidia.dali.__version__ in proc.stdout
    proc = run(capsys, "inspect", str(out), "--json")
    assert json.loads(proc.stdout)["decoder_drift"] == [entry]


def test_another_backend_is_refused_even_when_accepted(world, capsys, tmp_path):
    ref = _make_ref(world, capsys)
    out = _begun_elsewhere(ref, tmp_path / "gpu-made.zarr", backend="mixed", hw_decoder_load=0.0, gpu="NVIDIA H100 80GB HBM3")
    args = precompute_args(world["data"], world["teachers"], out)
    for extra in ([], ["--allow-decoder-mismatch"]):
        assert_user_error(run(capsys, *args, *extra), f"--out {out}", "'mixed'", "'cpu'", "--device cuda")
        assert "decoder_drift" not in _zarr_group(out).attrs
    assert_user_error(run(capsys, *args, "--dry-run"), f"--out {out}", "'mixed'", "--device cuda")
    source = _begun_elsewhere(ref, tmp_path / "gpu-made-complete.zarr", done_shards=None, backend="mixed", hw_decoder_load=0.0)
    extend = ["extend", str(source), "--crops-per-image", "5", "--out", str(tmp_path / "r5.zarr"), "--data", str(world["data"]),
              "--device", "cpu", "--allow-decoder-mismatch"]
    assert_user_error(run(capsys, *extend), f"STORE {source}", "'mixed'", "--device cuda")
    assert not (tmp_path / "r5.zarr").exists()


def test_dry_run_on_a_store_begun_elsewhere_asks_for_the_flag(world, capsys, tmp_path):
    ref = _make_ref(world, capsys)
    out = _begun_elsewhere(ref, tmp_path / "partial.zarr", dali_version=ELSEWHERE)
    args = precompute_args(world["data"], world["teachers"], out, "--dry-run")
    assert_user_error(run(capsys, *args), f"--out {out}", "dali_version", "--allow-decoder-mismatch")
    proc = run(capsys, *args, "--allow-decoder-mismatch")
    assert proc.returncode == 0, proc.stderr
    assert "shards pending" in proc.stderr and "decoder_drift" not in _zarr_group(out).attrs  # a dry run writes nothing


def test_extend_labels_new_crops_with_another_decoder_only_when_accepted(world, capsys, tmp_path):
    import nvidia.dali

    ref = _make_ref(world, capsys)
    source = _begun_elsewhere(ref, tmp_path / "made-elsewhere.zarr", done_shards=None, dali_version=ELSEWHERE)
    out = tmp_path / "r5.zarr"
    args = ["extend", str(source), "--crops-per-image", "5", "--out", str(out), "--data", str(world["data"]), "--batch-size", "4"]
    assert_user_error(run(capsys, *args), f"STORE {source}", "dali_version", "--allow-decoder-mismatch")
    assert not out.exists()
    proc = run(capsys, *args, "--allow-decoder-mismatch")
    assert proc.returncode == 0 and "differing: dali_version" in proc.stderr, proc.stderr
    assert "extend: 9 images x 2 crops = 18 crops to label" in proc.stderr and "(new)" in proc.stderr
    assert "completed" in _zarr_group(out).attrs
    attrs = _zarr_group(out).attrs.asdict()
    assert attrs["decoder"]["dali_version"] == ELSEWHERE
    [entry] = attrs["decoder_drift"]
    assert entry["command"] == "extend" and entry["decoder"]["dali_version"] == nvidia.dali.__version__


def test_merge_lists_every_input_decoder_that_differs(world, capsys, tmp_path):
    ref = _make_ref(world, capsys)
    other = _begun_elsewhere(ref, tmp_path / "other.zarr", done_shards=None, dali_version=ELSEWHERE)
    _zarr_group(other).attrs["store_id"] = "another-store-id"  # a second store of the same crops
    out = tmp_path / "merged.zarr"
    proc = run(capsys, "merge", str(ref), str(other), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    attrs = _zarr_group(out).attrs.asdict()
    assert attrs["decoder"] == _zarr_group(ref).attrs["decoder"]
    [entry] = attrs["decoder_drift"]
    assert entry["decoder"]["dali_version"] == ELSEWHERE and entry["fields"] == ["dali_version"] and entry["command"].startswith("merge of")
