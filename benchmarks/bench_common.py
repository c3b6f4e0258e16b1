"""Pieces the hand-run benchmarks share (imported by the scripts in this folder, which is their sys.path[0])."""
from __future__ import annotations

import os
from pathlib import Path


def tiny_student_file(work: Path, classes: int) -> Path:
    """A 2-conv TorchScript student (made once under ``work``) whose step is far cheaper than decoding its
    crops: distill's rate with it measures how close training gets to the loader's own rate."""
    import torch

    path = work / f"tiny_student_{classes}.pt"
    if not path.exists():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=4),
                                  torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, classes))
        torch.jit.script(net).save(str(path))
    return path


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (all its threads'), from /proc; [] if it is gone."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return out
