"""Multi-process policy (issue 10): balanced pending shards on a resumed multi-rank precompute, the
collective policy, per-rank seeds. Real torchrun (gloo) processes, real stores on disk."""
from __future__ import annotations

import shutil
import subprocess
import sys

import torch

from mealkd.core.distributed import default_group_backend, seed_for
from mealkd.precompute.runner import pending_for_rank
from tests.datagen import make_jpeg_tree
from tests.test_reliability_common import ENV, REPO, assert_same_store, precompute_args, tiny_teacher


def test_pending_shards_split_evenly_over_ranks():
    # after a partial run only odd shards are pending: `shard % world` would give rank 0 nothing
    assert [pending_for_rank([1, 3, 5, 7, 9], r, 2) for r in range(2)] == [[1, 5, 9], [3, 7]]
    assert [pending_for_rank([4], r, 3) for r in range(3)] == [[4], [], []]


def test_resumed_two_rank_precompute_balances_pending_shards(tmp_path):
    data = make_jpeg_tree(tmp_path / "train", classes=3, per_class=4)  # 12 images, 2 per shard -> 6 shards
    teacher = tiny_teacher(tmp_path / "t.pt")
    ref = tmp_path / "ref.zarr"
    args = precompute_args(data, f"{teacher}:size=16", ref)
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    partial = tmp_path / "partial.zarr"
    shutil.copytree(ref, partial)
    import zarr

    marks = zarr.open_group(str(partial), mode="r+")["done"]
    marks[2:4] = False  # shard 1
    marks[6:8] = False  # shard 3
    args[args.index("--out") + 1] = str(partial)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"), *args],
                         env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    # rank 0 labelled shard 1, rank 1 shard 3: the summary is the job's (it used to print rank 0's share)
    assert "4 images, 12 crops labelled by this run" in run.stderr, run.stderr[-3000:]
    assert "crops/s by 2 processes over" in run.stderr and "teachers (rank 0 of 2)" in run.stderr
    assert_same_store(partial, ref)


def test_collective_policy_keeps_cpu_tensors_off_nccl():
    assert default_group_backend(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert default_group_backend(torch.device("cpu")) == "gloo"


def test_seeds_differ_per_rank_and_epoch_and_repeat_exactly():
    seeds = {(r, e): seed_for(7, r, e) for r in range(8) for e in range(5)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(seed_for(7, r, e) == s for (r, e), s in seeds.items())
    assert all(0 <= s < 2**63 for s in seeds.values())
    masks = []
    for rank in range(2):
        torch.manual_seed(seed_for(7, rank, 0))
        masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert not torch.equal(masks[0], masks[1])


def test_one_process_torchrun_forms_a_group_and_runs_the_collectives(tmp_path):
    """Under torchrun even one process joins a process group, so a 1-GPU host exercises the same
    collectives (object broadcast, barrier, a device-tensor all-reduce) as an 8-GPU job."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from mealkd.core.distributed import init_distributed, shutdown\n"
        "d = init_distributed(torch.device('cpu'))\n"
        "assert d.active and dist.get_world_size() == 1 and dist.get_backend() == 'gloo'\n"
        "t = torch.ones(3); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0, 1.0]\n"
        "assert d.on_main(lambda: 'scanned') == 'scanned' and d.gather(5) == [5]\n"
        "d.barrier(); shutdown(d); print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)],
                          env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    alone = subprocess.run([sys.executable, "-c", "import torch; from core.distributed import init_distributed; "
                            "assert not init_distributed(torch.device('cpu')).active; print('alone')"],
                           env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert alone.returncode == 0 and "alone" in alone.stdout, alone.stderr[-2000:]


def test_sharded_evaluation_counts_every_image_exactly_once(tmp_path):
    """Each rank evaluates every world_size-th image; summed over ranks (what the all-reduce does) the
    counts equal one process's, at world sizes 1-3, including per class (9 images: uneven shards)."""
    import numpy as np

    from mealkd.core.dali_io import resolve_backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.distributed import Dist
    from mealkd.core.replay import Normalization
    from mealkd.distill.evaluate import evaluate

    tree = make_jpeg_tree(tmp_path / "val", classes=3, per_class=3, seed=4)
    index = scan_image_folder(tree)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    names = index.class_names
    whole = evaluate(model, index, names, Normalization(16), resolve_backend("cpu"), batch_size=4, per_class=True, num_threads=1)
    n = len(index)
    for world in (1, 2, 3):
        parts = [evaluate(model, index, names, Normalization(16), resolve_backend("cpu"), batch_size=4, per_class=True, num_threads=1,
                          dist=Dist(rank=r, world_size=world)) for r in range(world)]  # no group: each returns its own share
        assert all(p["images"] == n for p in parts)
        assert round(sum(p["top1"] for p in parts) * n) == round(whole["top1"] * n)
        assert round(sum(p["top5"] for p in parts) * n) == round(whole["top5"] * n)
        shard_ids = [np.arange(n)[r::world] for r in range(world)]
        assert sorted(np.concatenate(shard_ids).tolist()) == list(range(n))  # exactly once


def test_the_index_rank_0_shares_equals_a_local_scan(tmp_path):
    """Dist.on_main: rank 0 scans and broadcasts; rank 1 compares what it received with its own scan."""
    tree = make_jpeg_tree(tmp_path / "train", classes=2, per_class=3, seed=5)
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, numpy as np, torch\n"
        "from mealkd.core.dataset import scan_image_folder\n"
        "from mealkd.core.distributed import init_distributed, shutdown\n"
        "d = init_distributed(torch.device('cpu'))\n"
        "shared = d.on_main(lambda: scan_image_folder(sys.argv[1]))\n"
        "local = scan_image_folder(sys.argv[1])\n"
        "assert shared.fingerprint == local.fingerprint and shared.paths == local.paths and shared.root == local.root\n"
        "assert np.array_equal(shared.targets, local.targets) and np.array_equal(shared.byte_sizes, local.byte_sizes)\n"
        "print('rank', d.rank, 'ok'); shutdown(d)\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tree)],
                          env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.count("ok") == 2, done.stderr[-2000:]


def test_a_refusal_on_rank_0_is_one_line_for_the_whole_job(tmp_path):
    """Another writer holds the store's lock: rank 0's refusal reaches rank 1 through the process group, so
    the job prints it once and every rank exits 2 (rank 1 printed a gloo 'Connection closed by peer'
    traceback from the broadcast it was left waiting in)."""
    import fcntl
    import os

    data = make_jpeg_tree(tmp_path / "train", classes=2, per_class=2)
    teacher = tiny_teacher(tmp_path / "t.pt", classes=2)
    out = tmp_path / "s.zarr"
    args = precompute_args(data, f"{teacher}:size=16", out)
    with open(tmp_path / "s.zarr.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(str(os.getpid()))
        held.flush()
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"), *args],
                             env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode != 0
    assert run.stderr.count(f"another mealkd process (pid {os.getpid()}") == 1, run.stderr[-3000:]
    assert "gloo" not in run.stderr and "Connection closed" not in run.stderr, run.stderr[-3000:]
    assert "exitcode  : 2" in run.stderr  # torchrun's report: the first failed rank exited 2, as alone


def test_a_collective_broken_by_another_rank_is_recognised(monkeypatch):
    from mealkd.core.distributed import lost_peer

    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(gone) and lost_peer(torch.distributed.DistBackendError("NCCL communicator was aborted"))
    assert not lost_peer(RuntimeError("CUDA out of memory")) and not lost_peer(ValueError("[gloo]"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not lost_peer(gone)  # alone: a real error, shown as such


def test_single_process_commands_refuse_torchrun_once(monkeypatch, capsys):
    """merge, import-fkd, verify, evaluate, export, inspect, plot under a torchrun of N processes ran N whole
    copies (N JSON objects on stdout, racing --repair writes, merge failing on its own sibling's lock):
    refused in one line, printed by rank 0 only."""
    import pytest

    from mealkd import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        for command in (["merge", "a.zarr", "b.zarr", "--out", "c.zarr"], ["evaluate", "--data", "x", "--checkpoint", "y"], ["verify", "s.zarr"]):
            with pytest.raises(SystemExit) as exit_:
                cli.main(command)
            err = capsys.readouterr().err
            assert exit_.value.code == 2
            assert (f"error: {command[0]} runs in one process: run it without torchrun" in err) == said, err
            assert err.count("\n") == (1 if said else 0)
        with pytest.raises(SystemExit) as exit_:  # a usage error: every rank parsed the same argv, rank 0 says it
            cli.main(["distill", "--bogus"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and ("No such option '--bogus'" in err) == said, err
