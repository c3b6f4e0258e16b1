"""A precompute killed inside create_store leaves a partial group; the rerun must replace it (and
only it), whatever moment the kill hit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mealkd import storage
from mealkd.errors import UserError
def create(url: Path) -> None:
    storage.create_store(str(url), attributes={"class_names": ["a", "b"]}, paths=["a/0.jpg", "b/1.jpg"], targets=np.array([0, 1]),
                         sizes=np.full((2, 2), 8), crops_per_image=2, num_classes=2, encoding="dense")


@pytest.mark.parametrize("leftover", [
    {"zarr.json.3f2a9c.partial": b"{"},                                   # killed writing the group's metadata
    {"paths/zarr.json": b"{}", "zarr.json.77aa.partial": b""},            # an array landed, the group did not
    {"zarr.json": b'{"zarr_format": 3, "node_type": "group", "attributes": {}}', "windows/zarr.json.1.partial": b""},
])
def test_rerun_replaces_what_a_killed_create_left(tmp_path: Path, leftover: dict) -> None:
    url = tmp_path / "s.zarr"
    for name, data in leftover.items():
        (url / name).parent.mkdir(parents=True, exist_ok=True)
        (url / name).write_bytes(data)
    create(url)
    store = storage.open_store(str(url), require_complete=False)
    assert store.paths == ["a/0.jpg", "b/1.jpg"] and not store.done.any()
    assert not [p for p in url.rglob("*.partial")]


def test_anything_else_is_still_refused(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    url.mkdir()
    (url / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        create(url)
    assert (url / "notes.txt").read_text() == "mine"
