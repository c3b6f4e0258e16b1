"""The dataset index: ``scan_image_folder`` lists exactly what torchvision-style ``os.walk`` rules give
(nested directories, directory links followed, hidden entries and non-images left out), in the
canonical order, with the same fingerprint, so stores made before the faster scan still match."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mealkd.core.dataset import IMAGE_EXTENSIONS, scan_image_folder


def reference_scan(root: Path) -> tuple[list[str], list[int], list[int], str]:
    """The rules spelled out with os.walk + getsize (what the index was built with before)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, sizes, targets = [], [], []
    for k, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    full = os.path.join(dirpath, f)
                    found.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
        for rel, size in sorted(found):
            paths.append(rel)
            sizes.append(size)
            targets.append(k)
    digest = hashlib.sha256()
    for p, s, t in zip(paths, sizes, targets):
        digest.update(f"{p}\t{s}\t{classes[t]}\n".encode())
    return paths, sizes, targets, digest.hexdigest()


def test_scan_matches_the_walk_rules(tmp_path):
    root = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    files = {
        "b_class/z.jpg": 5, "b_class/a.JPEG": 7, "b_class/sub/deeper/x.png": 3, "b_class/sub/y.webp": 4,
        "b_class/.hidden.jpg": 9, "b_class/notes.txt": 2, "b_class/.cache/skip.jpg": 6,
        "a_class/img 1.jpg": 11, "a_class/img_10.jpg": 12, "a_class/img_2.jpg": 13,
        ".hidden_class/x.jpg": 1,
    }
    for rel, n in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff" * n)
    (elsewhere / "linked").mkdir(parents=True)
    (elsewhere / "linked" / "m.jpg").write_bytes(b"\x00" * 21)
    os.symlink(elsewhere / "linked", root / "a_class" / "via_link")
    index = scan_image_folder(root)
    paths, sizes, targets, fingerprint = reference_scan(root)
    assert index.class_names == ["a_class", "b_class"]
    assert index.paths == paths
    assert index.byte_sizes.tolist() == sizes and index.targets.tolist() == targets
    assert index.fingerprint == fingerprint
    assert "a_class/via_link/m.jpg" in index.paths and "b_class/sub/deeper/x.png" in index.paths
    assert not any("hidden" in p or ".cache" in p or p.endswith(".txt") for p in index.paths)
    assert index.paths[:3] == ["a_class/img 1.jpg", "a_class/img_10.jpg", "a_class/img_2.jpg"]
    assert np.array_equal(index.read_bytes(index.paths.index("a_class/via_link/m.jpg")), np.zeros(21, np.uint8))
    # what is left out as not an image is counted and named (precompute prints it: a .gif among the images was dropped
    # without a word); hidden files are not counted
    assert (index.ignored, index.ignored_examples) == (1, ("b_class/notes.txt",))
    assert index.describe_ignored().startswith("1 file(s) that are not images by their extension (.jpg, .jpeg, .png")
    assert index.describe_ignored().endswith("are left out, e.g. b_class/notes.txt")


def test_broken_links_and_link_loops_are_one_line_errors(tmp_path, capsys):
    """A broken image link, a directory link back up the tree, or a loop of links: one UserError naming
    the link (and where a broken one points), not a FileNotFoundError / 'too many levels' traceback; the
    scan is every command's, so precompute's CLI says the same."""
    import pytest

    from mealkd.errors import UserError
    from tests.test_reliability_common import assert_user_error, precompute_args, run, tiny_teacher

    root = tmp_path / "data"
    (root / "c0").mkdir(parents=True)
    (root / "c0" / "ok.jpg").write_bytes(b"\xff" * 4)
    cases = {
        "broken": (lambda: os.symlink(tmp_path / "gone.jpg", root / "c0" / "broken.jpg"),
                   ["--data", str(root / "c0" / "broken.jpg"), "broken symbolic link", str(tmp_path / "gone.jpg")]),
        "up the tree": (lambda: os.symlink("..", root / "c0" / "up"), [str(root / "c0" / "up"), "symbolic link loop", str(root)]),
        "loop of links": (lambda: (os.symlink("b.jpg", root / "c0" / "a.jpg"), os.symlink("a.jpg", root / "c0" / "b.jpg")),
                          ["loop of symbolic links", str(root / "c0")]),
    }
    for name, (make, needles) in cases.items():
        for link in (root / "c0").iterdir():
            if link.is_symlink():
                link.unlink()
        make()
        with pytest.raises(UserError) as err:
            scan_image_folder(root)
        assert all(needle in str(err.value) for needle in needles), (name, str(err.value))
    teacher = tiny_teacher(tmp_path / "t.pt", classes=1)
    proc = run(capsys, *precompute_args(root, str(teacher), tmp_path / "s.zarr"))
    assert_user_error(proc, "--data", "loop of symbolic links")


def test_what_would_drop_images_in_silence_is_one_line(tmp_path):
    """A class or a folder of images behind a link to nothing (a disk not mounted), a directory that cannot
    be read, and a name that is not UTF-8 (the store records UTF-8 names): each was skipped in silence or a
    traceback; now one UserError naming the path."""
    import shutil
    import subprocess
    import sys

    import pytest

    from mealkd.errors import UserError

    def tree(name: str) -> Path:
        root = tmp_path / name
        (root / "c0" / "sub").mkdir(parents=True)
        (root / "c0" / "ok.jpg").write_bytes(b"\xff" * 4)
        (root / "c0" / "sub" / "deep.jpg").write_bytes(b"\xff" * 4)
        return root

    root = tree("class_link")
    os.symlink("/nonexistent/mount/c1", root / "c1")
    with pytest.raises(UserError, match=r"c1 is a broken symbolic link \(it points to /nonexistent/mount/c1\)"):
        scan_image_folder(root)
    root = tree("folder_link")
    os.symlink("/nonexistent/mount/more", root / "c0" / "more")
    with pytest.raises(UserError, match="more is a broken symbolic link"):
        scan_image_folder(root)
    root = tree("latin1")
    (root / "c0" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"\xff" * 4)
    with pytest.raises(UserError, match=r"caf\\xe9.jpg: the name is not UTF-8") as err:
        scan_image_folder(root)
    assert "convmv" in str(err.value)
    root = tree("latin1_class")
    (root / os.fsdecode(b"th\xe9")).mkdir()
    with pytest.raises(UserError, match="the name is not UTF-8"):
        scan_image_folder(root)
    # an unreadable folder: root reads everything, so the scan runs as an unprivileged user (a user namespace)
    root = tree("unreadable")
    (root / "c0" / "sub").chmod(0)
    unshare = shutil.which("unshare")
    try:
        probe = subprocess.run([unshare, "-U", "true"], capture_output=True) if unshare else None
        if probe is None or probe.returncode != 0:
            pytest.skip("needs unshare -U to scan as an unprivileged user")
        code = ("import sys; from mealkd.core.dataset import scan_image_folder\n"
                "from mealkd.errors import UserError\n"
                f"try: scan_image_folder({str(root)!r})\n"
                "except UserError as err: print(err); sys.exit(2)")
        done = subprocess.run([unshare, "-U", sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        (root / "c0" / "sub").chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert f"{root / 'c0' / 'sub'} cannot be read (Permission denied); fix its permissions" in done.stdout, done.stdout
