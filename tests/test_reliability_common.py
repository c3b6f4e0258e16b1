"""Shared helpers of the reliability suite (tests/test_reliability_*.py, tests/test_verify.py); no tests here.

Everything is real: ``cli.py`` in a subprocess (so exit codes, stderr and SIGKILL are the real
thing), DALI on CPU, Zarr stores on disk, TorchScript teachers made here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# one BLAS thread: the machine's two cores are shared, and torch's default threading is 10x slower
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop("MEALKD_TEST_KILL_AT", None)
LABEL_ARRAYS = ("paths", "targets", "sizes", "excluded", "windows", "flips", "done", "probs", "topk_idx", "topk_val")


class TinyTeacher(torch.nn.Module):
    """conv -> relu -> global pool -> linear; ``nan_above``: rows whose mean input exceeds it give NaN."""

    def __init__(self, classes: int, nan_above: float = 1e9):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, classes)
        self.nan_above = nan_above

    def forward(self, x):
        logits = self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))
        hot = x.mean(dim=(1, 2, 3)) > self.nan_above
        return torch.where(hot[:, None], torch.full_like(logits, float("nan")), logits)


def tiny_teacher(path: Path, classes: int = 3, seed: int = 0, nan_above: float = 1e9) -> Path:
    torch.manual_seed(seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TinyTeacher(classes, nan_above)).save(str(path))
    return path


def cli(*args: str, kill_at: str | None = None, timeout: float = 180, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if kill_at:
        env["MEALKD_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def spawn(*args: str, kill_at: str | None = None) -> subprocess.Popen:
    env = dict(ENV)
    if kill_at:
        env["MEALKD_TEST_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one 'error:' line which is the last line and names ``needles``."""
    err = proc.stderr
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def precompute_args(data: Path, teachers: str, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--data", str(data), "--teachers", teachers, "--out", str(out), "--crops-per-image", "3",
            "--image-size", "16", "--batch-size", "4", "--images-per-shard", "2", "--device", "cpu", *extra]


def distill_args(store: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--labels", str(store), "--data", str(data), "--student", "torchvision:mobilenet_v3_small",
            "--init", "scratch", "--out", str(out), "--epochs", "2", "--batch-size", "4", "--device", "cpu", *extra]


def store_arrays(url: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(url), mode="r")
    return {name: np.asarray(group[name][:]) for name in LABEL_ARRAYS if name in group}


def store_attrs(url: Path) -> dict:
    import zarr

    attrs = zarr.open_group(str(url), mode="r").attrs.asdict()
    return {k: v for k, v in attrs.items() if k not in ("created", "completed", "store_id")}


def assert_same_store(got: Path, want: Path) -> None:
    a, b = store_arrays(got), store_arrays(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), f"array {name} differs"
    assert store_attrs(got) == store_attrs(want)


def run(capsys, *argv: str) -> subprocess.CompletedProcess:
    """``cli.main`` in-process, its exit code and captured output as a CompletedProcess."""
    from mealkd import cli
    capsys.readouterr()
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), code, out, err)


def tiny_world(root: Path, seed: int) -> tuple[Path, str]:
    """A 3-class x 3-image JPEG tree under root/data and a two-teacher spec (TorchScript, weights 1 and 0.5)."""
    from tests.datagen import make_jpeg_tree

    data = make_jpeg_tree(root / "data", classes=3, per_class=3, seed=seed, min_side=24, max_side=36)
    return data, f"{tiny_teacher(root / 't1.pt', seed=1)},{tiny_teacher(root / 't2.pt', seed=2)}:w=0.5"
