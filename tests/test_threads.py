"""``--num-threads auto`` (the default): how many DALI CPU threads a process gets, and the flag's parsing.

A GPU process gets the cores it may use less 2 for its Python threads, at most 16, sharing an unbound
machine with its node's other torchrun processes; a CPU process keeps 2 (the cores are the model's).
Before, every command defaulted to 2 DALI threads, on a GPU too, where nvJPEG's CPU (Huffman) stage
then limits stage two well below what an H100 trains at.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from mealkd.core.dali_io import Backend, auto_thread_count, auto_threads, build_pipeline, cgroup_cpu_limit, dali_threads
from tests.test_reliability_common import distill_args, precompute_args, run, tiny_world


@pytest.mark.parametrize("usable, machine, local, want", [
    (16, 16, 1, 14),    # the GPU check's host: one process
    (96, 96, 8, 10),    # an 8-GPU node, torchrun, processes not bound: 12 cores each
    (12, 96, 8, 10),    # the same node, each process bound to its 12 cores by the launcher: not divided again
    (256, 256, 1, 16),  # capped
    (2, 2, 1, 1),       # at least one
    (16, 16, 0, 14),    # LOCAL_WORLD_SIZE unset / nonsense: one process
])
def test_auto_thread_count(usable, machine, local, want):
    assert auto_thread_count(usable, machine, local) == want


@pytest.mark.parametrize("usable, machine, local, quota, want", [
    (128, 128, 8, 96.0, 10),   # a Kubernetes pod limited to 96 CPUs of a 128-core node, 8 ranks: 12 each, not 16
    (16, 16, 1, 4.0, 2),       # one process in a 4-CPU container
    (16, 16, 1, 1.5, 1),       # under 2 CPUs: still one thread
    (96, 96, 8, 200.0, 10),    # a quota above the cores changes nothing
])
def test_a_container_cpu_quota_caps_the_count(usable, machine, local, quota, want):
    assert auto_thread_count(usable, machine, local, quota) == want


def test_cgroup_cpu_limit_reads_v2_and_v1_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(v2)) is None
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 4.0
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) is None
    (v1 / "cpu.cfs_quota_us").write_text("250000\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) == 2.5
    assert cgroup_cpu_limit(str(tmp_path / "nowhere")) is None
    here = cgroup_cpu_limit()  # this machine's own: none, or a positive number of CPUs
    assert here is None or here > 0


def test_auto_threads_per_device(monkeypatch):
    cpu, gpu = Backend(torch.device("cpu")), Backend(torch.device("cuda", 0))  # a Backend only describes the device
    assert auto_threads(cpu) == 2 and dali_threads(None, cpu) == 2 and dali_threads(5, cpu) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    usable = len(os.sched_getaffinity(0))
    assert auto_threads(gpu) == auto_thread_count(usable, os.cpu_count(), 1, cgroup_cpu_limit())


def test_a_pipeline_built_with_auto_gets_the_devices_count():
    from nvidia.dali import fn, types

    cpu = Backend(torch.device("cpu"))
    pipe = build_pipeline(lambda: fn.external_source(name="x", dtype=types.UINT8, batch=True), batch_size=2, backend=cpu, num_threads=None)
    assert pipe.num_threads == 2
    pipe = build_pipeline(lambda: fn.external_source(name="x", dtype=types.UINT8, batch=True), batch_size=2, backend=cpu, num_threads=3)
    assert pipe.num_threads == 3


def test_the_flag_takes_auto_or_a_positive_number(tmp_path, capsys):
    data, teachers = tiny_world(tmp_path, seed=3)
    store = tmp_path / "s.zarr"
    for bad in ("0", "-2", "many"):
        proc = run(capsys, *precompute_args(data, teachers, store, "--num-threads", bad))
        assert proc.returncode == 2 and "--num-threads" in proc.stderr and "auto" in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()
    proc = run(capsys, *precompute_args(data, teachers, store, "--num-threads", "auto"))
    assert proc.returncode == 0, proc.stderr
    for threads, want in ((None, 2), ("3", 3)):  # the run records what it got
        out = tmp_path / f"run-{threads}"
        extra = ["--epochs", "1"] + (["--num-threads", threads] if threads else [])
        proc = run(capsys, *distill_args(store, data, out, *extra))
        assert proc.returncode == 0, proc.stderr
        assert json.loads((out / "config.json").read_text())["run_info"]["dali_threads"] == want
    proc = run(capsys, "evaluate", "--data", str(data), "--checkpoint", str(tmp_path / "run-3" / "checkpoint.pt"), "--num-threads", "1", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["images"] == 9, proc.stderr
