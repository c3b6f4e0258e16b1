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
import torch
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
    if not torch.cuda.is_available():  # --device auto follows the store's GPU decoder: on a machine without one, say so
        auto = [a for a in extend if a not in ("--device", "cpu", "--allow-decoder-mismatch")]
        assert_user_error(run(capsys, *auto), f"STORE {source}", "decoded on a GPU (DALI backend 'mixed')", "extend it on a GPU machine")
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
    assert "extend: 9 images x 2 crops = 18 crops to label" in proc.stderr and "shard(s) pending)" in proc.stderr
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


def _records(*dali_versions: str) -> list[dict]:
    """Real decoder records of this machine's CPU decoder, one per rank, with the DALI version each rank
    reports (what ranks on nodes with different containers record)."""
    from mealkd.core.dali_io import decoder_record, resolve_backend

    here = decoder_record(resolve_backend("cpu"))
    return [dict(here, dali_version=v) if v else dict(here) for v in dali_versions]


def test_every_rank_of_a_job_is_judged_not_only_rank_0():
    from mealkd.errors import UserError
    from mealkd.precompute.decoder_drift import judge_decoders

    kwargs = dict(where="--out S", command="precompute")
    same = _records("", "", "")
    assert judge_decoders(None, same, allow=False, **kwargs).drifts == ()
    assert judge_decoders(same[0], same, allow=False, **kwargs).drifts == ()

    # a new store records rank 0's decoder: ranks 1 and 2, on another container, are named against it
    mixed = _records("", ELSEWHERE, ELSEWHERE)
    with pytest.raises(UserError) as refused:
        judge_decoders(None, mixed, allow=False, **kwargs)
    message = str(refused.value)
    assert message.startswith("--out S: the job's ranks decode with different 'cpu' decoders")
    assert f"'{ELSEWHERE}' on ranks 1, 2" in message and "on rank 0" in message and "--allow-decoder-mismatch" in message
    [entry] = judge_decoders(None, mixed, allow=True, **kwargs).drifts
    assert entry == {"decoder": mixed[1], "fields": ["dali_version"], "command": "precompute", "ranks": [1, 2]}

    # a store begun elsewhere: every rank that differs from its record, one entry per distinct decoder
    stored = _records("9.9.9")[0]
    three = _records("", ELSEWHERE, "")
    with pytest.raises(UserError, match="in the store vs .* on ranks 0, 2"):
        judge_decoders(stored, three, allow=False, **kwargs)
    entries = judge_decoders(stored, three, allow=True, **kwargs).drifts
    assert [(e["decoder"]["dali_version"], e["ranks"]) for e in entries] == [(three[0]["dali_version"], [0, 2]), (ELSEWHERE, [1])]
    # one process: the message and entry as before (no rank numbers)
    with pytest.raises(UserError, match=f"dali_version '9.9.9' in the store vs '{three[0]['dali_version']}' here"):
        judge_decoders(stored, three[:1], allow=False, **kwargs)
    assert "ranks" not in judge_decoders(stored, three[:1], allow=True, **kwargs).drifts[0]

    # another backend on some rank is refused whatever the flag
    gpu_rank = dict(same[0], backend="mixed")
    with pytest.raises(UserError, match="rerun with --device cpu"):
        judge_decoders(same[0], [same[0], gpu_rank], allow=True, **kwargs)


def test_two_rank_job_records_which_ranks_decoded_differently(world, capsys, tmp_path):
    """The collective path under torchrun (gloo): both ranks continue a store begun under another DALI
    version; with the flag the store lists that decoder once, with the ranks that used it."""
    import subprocess
    import sys

    from tests.test_reliability_common import ENV, REPO

    ref = _make_ref(world, capsys)
    out = _begun_elsewhere(ref, tmp_path / "partial.zarr", done_shards=1, dali_version=ELSEWHERE)
    args = precompute_args(world["data"], world["teachers"], out, "--allow-decoder-mismatch")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"), *args],
                          env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decoded on ranks 0, 1 by another decoder" in proc.stderr
    [entry] = _zarr_group(out).attrs["decoder_drift"]
    assert entry["ranks"] == [0, 1] and entry["fields"] == ["dali_version"]
    got, want = store_arrays(out), store_arrays(ref)
    assert all(np.array_equal(got[name], want[name]) for name in want)
