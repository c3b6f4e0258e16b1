"""--precision in stage one (issue 10): recorded in the store, part of its settings, an fp16 overflow
rerun in fp32 instead of being called bad weights, and `verify` judging a reduced-precision store
by drift tolerances instead of calling fp16 rounding damage. Real precompute/verify on CPU."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from mealkd import storage
from tests.test_reliability_common import assert_user_error, precompute_args, run, tiny_world

torch.set_num_threads(1)


class Overflowing(torch.nn.Module):
    """A teacher whose hidden activations exceed fp16's range (65504) but whose logits are ordinary."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(3, 8)
        self.down = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.up.weight.fill_(3e4)
            self.up.bias.zero_()
            self.down.weight.copy_(torch.randn(3, 8) * 1e-5)
            self.down.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x.mean(dim=(2, 3)).abs() + 1.0))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    data, teachers = tiny_world(root, seed=3)
    return root, data, teachers


def test_precision_is_recorded_and_part_of_the_store_settings(world, tmp_path, capsys):
    _, data, teachers = world
    out = tmp_path / "bf16.zarr"
    assert run(capsys, *precompute_args(data, teachers, out, "--precision", "bf16")).returncode == 0
    assert storage.open_store(str(out)).attrs["precision"] == "bf16"
    proc = run(capsys, *precompute_args(data, teachers, out, "--precision", "fp32"))
    assert_user_error(proc, str(out), "other settings", "--precision: the teachers would run in fp32 (the store: bf16)")
    default = tmp_path / "auto.zarr"
    assert run(capsys, *precompute_args(data, teachers, default)).returncode == 0
    assert storage.open_store(str(default)).attrs["precision"] == "fp32"  # auto on CPU


def test_fp16_overflow_is_recomputed_in_fp32_not_called_bad_weights(world, tmp_path, capsys):
    root, data, _ = world
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Overflowing()).save(str(tmp_path / "big.pt"))
        probe = torch.jit.load(str(tmp_path / "big.pt"))
    x = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(probe(x)).all()  # the premise: this teacher overflows in fp16
    assert torch.isfinite(probe(x)).all()
    out = tmp_path / "fp16.zarr"
    proc = run(capsys, *precompute_args(data, f"{tmp_path / 'big.pt'}:size=16", out, "--precision", "fp16"))
    assert proc.returncode == 0, proc.stderr
    assert "recomputed in fp32" in " ".join(proc.stderr.split())
    assert storage.open_store(str(out)).attrs["precision"] == "fp16"


def test_verify_judges_a_reduced_precision_store_by_drift_not_damage(world, tmp_path, capsys):
    """A bf16 store recomputed in fp32 on the CPU differs by rounding: verify passes on the drift
    tolerances and marks nothing damaged; the same store with labels of other crops still fails."""
    import numpy as np
    import zarr

    _, data, teachers = world
    out = tmp_path / "bf16.zarr"
    assert run(capsys, *precompute_args(data, teachers, out, "--precision", "bf16")).returncode == 0
    proc = run(capsys, "verify", str(out), "--data", str(data), "--teachers", teachers, "--sample", "27", "--device", "cpu")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout
    assert "numeric drift expected" in text and "bf16 teachers" in text and "damaged" not in text
    bad = tmp_path / "bad.zarr"
    shutil.copytree(out, bad)
    probs = zarr.open_group(str(bad), mode="r+")["probs"]
    rows = np.asarray(probs[:])
    onehot = np.zeros_like(rows)
    onehot[..., 0] = 1.0  # confident labels no teacher gave
    probs[:] = onehot
    proc = run(capsys, "verify", str(bad), "--data", str(data), "--teachers", teachers, "--sample", "27", "--device", "cpu")
    assert proc.returncode == 1 and "damaged shards" in proc.stdout


@pytest.fixture
def restore_numerics(monkeypatch):
    """apply_numerics sets process-wide torch flags: put them back after the test."""
    from mealkd.core.accel import numerics_restored

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with numerics_restored():
        yield


def test_numerics_policy_for_cuda_runs(restore_numerics):
    """The kernel policy a CUDA run gets (the flags are torch's, settable without a GPU): --deterministic
    = deterministic algorithms (warn only), no autotuning, cuBLAS's fixed workspace; fp32 = no TF32;
    a default bf16 run autotunes its fixed-size batches and keeps TF32 as torch has it."""
    import os

    from mealkd.core.accel import apply_numerics

    cuda = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = True
    apply_numerics(cuda, "bf16", fixed_shapes=True)
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
    apply_numerics(cuda, "fp32", deterministic=True, fixed_shapes=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    from mealkd.core.accel import numerics_restored

    with numerics_restored():
        apply_numerics(cuda, "bf16", fixed_shapes=True)
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()  # the fp32 policy is back


def test_distill_deterministic_is_an_operational_flag(world, tmp_path, capsys, restore_numerics):
    """--deterministic is recorded in config.json and may change on --resume (it changes kernels, not the run)."""
    import json

    from mealkd.distill.config import TRAINING_FLAGS
    from tests.test_reliability_common import distill_args

    assert "deterministic" not in TRAINING_FLAGS
    root, data, teachers = world
    store, out = tmp_path / "s.zarr", tmp_path / "run"
    assert run(capsys, *precompute_args(data, teachers, store)).returncode == 0
    first = run(capsys, *distill_args(store, data, out, "--epochs", "2", "--deterministic"))
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "config.json").read_text())["config"]["deterministic"] is True
    assert torch.are_deterministic_algorithms_enabled()
