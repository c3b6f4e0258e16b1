"""One namespace when installed (issue 12): the wheel installs everything under `mealkd` (no top-level
`core`, `storage`, `distill`, `precompute`, `demo` or `cli` to collide with a user's own modules), and
the installed package works from outside the checkout. Real wheel build and install into a folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_mealkd_package_that_works_outside_the_checkout(tmp_path):
    # build from a copy of the sources: a build/ folder left in the checkout could carry stale modules into the wheel
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", "demo_out", "runs", ".gpu*"))
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("mealkd-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"mealkd"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    sources = {f"mealkd/{path.relative_to(REPO).as_posix()}" for folder in ("core", "storage", "precompute", "distill", "demo")
               for path in (REPO / folder).rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))  # every module of the checkout is in the wheel
    assert {"mealkd/cli.py", "mealkd/errors.py", "mealkd/faults.py", "mealkd/core/models/__init__.py", "mealkd/storage/reader.py", "mealkd/distill/trainer.py",
            "mealkd/precompute/runner.py", "mealkd/demo/run.py"} <= set(names)

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "core.py").write_text("WHO = 'the user'\n")  # a user's own top-level module named like ours
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    probe = (
        "import core, mealkd, mealkd.distill.trainer, mealkd.core.models, mealkd.storage\n"
        "assert core.WHO == 'the user'\n"
        f"assert mealkd.__file__.startswith({str(site)!r}), mealkd.__file__\n"
        f"assert mealkd.distill.trainer.__file__.startswith({str(site)!r})\n"
        "assert len(mealkd.__path__) == 1\n"
        "print('ok')\n"
    )
    ran = subprocess.run([sys.executable, "-S", "-c", probe], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "ok" in ran.stdout, ran.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-S", "-m", "mealkd.cli", "distill", "--help"], env=env, cwd=elsewhere, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "--labels" in cli.stdout, cli.stderr[-2000:]
