"""benchmarks/gpu_check.py in its CPU smoke form (``--device cpu --quick``), so the GPU check cannot rot.

The script runs for real in a subprocess: it writes its own JPEG tree and teachers, runs precompute,
distill (straight, killed + --resume, torchrun) and the in-process replay and throughput checks.
The CUDA-only rows must be SKIP with a reason; the throughput rows are reported (INFO/WARN), never
FAIL, because CPU numbers are not the target.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))

CPU_ROWS = ("precompute cpu", "replay identity (stage 1 == stage 2)", "distill resume == straight",
            "torchrun 1-process precompute", "torchrun 1-process distill")
CUDA_ROWS = ("store cpu == cuda", "one step cpu == cuda (same pixels)", "decoder pixels cpu vs cuda", "distill loss cuda ~ cpu", "evaluate cuda ~ cpu",
             "teachers: CUDA graphs / eager")
THROUGHPUT_ROWS = ("precompute / teacher-only", "distill / student-step-only", "loader / student-step-only")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "r.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--work", str(root / "work"), "--json", str(out)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_quick_cpu_run_passes(quick_run):
    proc, result = quick_run
    rows = {r["check"]: r for r in result["rows"]}
    assert result["passed"] is True and result["device"] == "cpu" and result["quick"] is True
    assert {r["status"] for r in result["rows"]} <= {"PASS", "WARN", "SKIP", "INFO"}, result["rows"]
    for name in CPU_ROWS:
        assert rows[name]["status"] == "PASS", rows[name]
    for name in CUDA_ROWS:
        assert rows[name]["status"] == "SKIP" and "CUDA" in rows[name]["detail"], rows[name]
    for name in THROUGHPUT_ROWS:
        assert rows[name]["status"] in ("INFO", "WARN"), rows[name]
        assert float(rows[name]["value"]) > 0 and rows[name]["threshold"].startswith(">=")
    assert rows["teachers: BatchNorm folded / as loaded"]["status"] == "INFO"  # the quick teacher (resnet18) has BatchNorm to fold
    assert float(rows["teachers: BatchNorm folded / as loaded"]["value"]) > 0
    assert "s for crops" in rows["precompute / teacher-only"]["detail"]  # precompute's own time report
    assert rows["precompute --dry-run / real"]["status"] == "INFO" and float(rows["precompute --dry-run / real"]["value"]) > 0
    assert "bit-equal" in rows["replay identity (stage 1 == stage 2)"]["value"]
    assert "K=2" in rows["replay identity (stage 1 == stage 2)"]["detail"]
    assert all(job["exit"] in (0, 143) for job in result["subprocesses"]), result["subprocesses"]
    assert [job["exit"] for job in result["subprocesses"] if job["name"].startswith("distill-killed")] == [143]  # SIGTERM: saved, stopped
    assert "SIGTERM at step 1 of epoch 2" in rows["distill resume == straight"]["detail"]
    # the PASS/FAIL ratios are measured and recorded before any INFO row of the phase (a run cut short keeps them)
    order = [r["check"] for r in result["rows"]]
    last_ratio = max(order.index(name) for name in THROUGHPUT_ROWS)
    for info in ("teachers: cuDNN autotuned / not", "teachers: BatchNorm folded / as loaded", "precompute --dry-run / real",
                 "loader: hardware JPEG decoder / pinned", "loader: DALI threads auto / all cores"):
        assert order.index(info) > last_ratio, order


def test_an_info_row_that_does_not_fit_the_budget_is_skipped(tmp_path):
    """--budget-s: a throughput INFO row runs only if its estimated time is left, else it is a SKIP row saying so."""
    import time

    from benchmarks import gpu_check

    ctx = gpu_check.Ctx(work=tmp_path, device="cpu", quick=True, plan=gpu_check.QUICK, threads=1)
    assert gpu_check.fits(ctx, "x", 1e9) is None  # no --budget-s: everything fits
    ctx.deadline = time.perf_counter() + 30
    assert gpu_check.fits(ctx, "x", 20) is None
    row = gpu_check.fits(ctx, "teachers: cuDNN autotuned / not", 45)
    assert row.status == "SKIP" and row.check == "teachers: cuDNN autotuned / not" and "under the ~45 s" in row.detail


def test_output_has_environment_and_one_table(quick_run):
    proc, result = quick_run
    for key in ("date", "gpu", "torch", "torchvision", "dali", "zarr"):
        assert key in result["environment"]
        assert f"  {key} " in proc.stdout
    header = [line for line in proc.stdout.splitlines() if line.startswith("| check")]
    assert len(header) == 1
    for row in result["rows"]:
        assert f"| {row['check']}" in proc.stdout
    assert "PASS:" in proc.stdout.splitlines()[-2]


def test_refuses_a_foreign_work_directory(tmp_path):
    """--work pointing at someone's non-empty directory is refused before anything is deleted."""
    from benchmarks import gpu_check

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty and was not made by this script"):
        gpu_check.prepare_work(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
