"""Progress in logs: off a terminal (SLURM, Kubernetes), the long commands print plain progress lines
every MEALKD_PROGRESS_SECONDS instead of a live bar that would show nothing until the end."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from tests.datagen import make_jpeg_tree

REPO = Path(__file__).resolve().parents[1]


def test_precompute_prints_plain_progress_lines_into_a_log(tmp_path):
    tree = make_jpeg_tree(tmp_path / "train", 3, 8, seed=0)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pth")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MEALKD_PROGRESS_SECONDS="0")
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), "precompute", "--data", str(tree), "--teachers",
                           f"torchvision:resnet18@{tmp_path / 'r18.pth'}", "--out", str(tmp_path / "s.zarr"), "--crops-per-image", "2",
                           "--image-size", "16", "--batch-size", "4", "--device", "cpu", "--num-threads", "1"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stderr and "━" not in done.stderr  # no bar, no terminal codes in a log file
    lines = [m.groups() for m in re.finditer(r"^teachers (\d+)/24 [\d,.]+ images/s [\d,.]+ crops/s \S+ ETA \S+$", done.stderr, re.M)]
    counts = [int(n) for (n,) in lines]
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] == 24, done.stderr  # a line per update, then the end
    assert re.search(r"^validate 24/24 ", done.stderr, re.M), done.stderr


def test_the_console_prints_emoji_codes_as_written():
    """The dry run's encoding table printed 'topk:100:' as 'topk💯' (rich's emoji codes)."""
    from mealkd.console import make_console

    console = make_console(stderr=False, record=True, width=200)
    console.print("topk:100: 1,822 B/crop  --data /data/:cat:/train", markup=False, highlight=False)
    assert console.export_text().strip() == "topk:100: 1,822 B/crop  --data /data/:cat:/train"
