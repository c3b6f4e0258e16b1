"""The README's main job, reduced: `cli.py demo --quick` end to end, then a rerun that reuses everything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mealkd import storage
REPO = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run(
        [sys.executable, "cli.py", "demo", "--quick", "--seeds", "2", "--out", str(out), "--device", "cpu", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )


def test_quick_demo_runs_end_to_end_and_reuses_its_work(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    # every model of the story was evaluated, with accuracies that are fractions
    assert set(results["teachers"]) == {"resnet18", "shufflenet_v2_x0_5"}
    accuracies = [results["ensemble"], *results["teachers"].values()]
    for key in ("student_a", "student_b"):
        accuracies += results[key]["baseline"] + results[key]["distilled"]
    assert len(results["student_a"]["distilled"]) == 2 and len(results["student_a"]["hard_label_control"]) == 2
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    # the summary table reached stdout, the plot is a real PNG
    assert "distilled from the SAME store" in first.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # both students were distilled from one complete store, through the CLI's own checkpoints
    store = storage.open_store(str(out / "labels.zarr"))
    assert store.crops_per_image == 2 and bool(store.done.all())
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["resnet18_seed0", "shufflenet_v2_x0_5_seed0", "shufflenet_v2_x0_5_seed1"]
    for run in runs:
        lines = (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    # rerun: nothing is retrained, the store is not rewritten, the same numbers come out
    models_before = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    second = run_demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reuse teacher_resnet18_seed0.pth" in second.stdout
    assert not [line for line in second.stdout.splitlines() if line.startswith("trained ")]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == models_before
    again = json.loads((out / "results.json").read_text())
    assert again["student_a"] == results["student_a"] and again["ensemble"] == results["ensemble"]
