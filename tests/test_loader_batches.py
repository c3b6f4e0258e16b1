"""The training loader never yields a one-crop batch (train-mode BatchNorm cannot normalise one
sample) and never drops an image to avoid it: the last two batches are rebalanced instead."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from mealkd import storage
from mealkd.core.dali_io import resolve_backend
from mealkd.core.dataset import scan_image_folder
from mealkd.core.replay import Normalization
from mealkd.distill.loader import ReplayLoader
from mealkd.precompute.runner import PrecomputeConfig, run_precompute
from tests.datagen import make_jpeg_tree


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # 3 "classes" from the 3 channel means


@pytest.fixture(scope="module")
def nine_images(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("batches")
    tree = make_jpeg_tree(root / "train", classes=3, per_class=3, seed=4)
    torch.jit.script(MeanColour()).save(str(root / "colour.pt"))
    run_precompute(PrecomputeConfig(data=str(tree), teachers=f"{root / 'colour.pt'}", out=str(root / "s.zarr"), crops_per_image=2, image_size=16, device="cpu", num_threads=1))
    index = scan_image_folder(tree)
    return storage.open_store(str(root / "s.zarr"), fingerprint=index.fingerprint), index


@pytest.mark.parametrize("batch_size, k, expected", [(4, 1, [4, 3, 2]), (8, 1, [7, 2]), (3, 1, [3, 3, 3]), (4, 2, [8, 8, 2])])
def test_last_batch_is_never_a_single_crop_and_nothing_is_dropped(nine_images, batch_size, k, expected) -> None:
    store, index = nine_images
    loader = ReplayLoader(store, index, Normalization(16), resolve_backend("cpu"), batch_size=batch_size, crops_per_step=k, num_threads=1)
    try:
        sizes, rows = [], []
        for images, labels, _ in loader.epoch(0):
            sizes.append(images.shape[0])
            rows.append(labels)
        assert sizes == expected and loader.steps_per_epoch() == len(expected)
        seen = torch.cat(rows)
        expected_rows = np.stack([store.slot_labels(slot, loader.images(0)) for slot in loader.slots(0)], axis=1).reshape(-1, store.num_classes)
        assert torch.equal(seen, torch.from_numpy(expected_rows))  # all 9 images, in visiting order
    finally:
        loader.close()


def test_epoch_labels_are_held_as_stored_and_decode_to_the_store_rows(nine_images) -> None:
    """Label memory: the loader keeps fp16 rows (half of float32), and decoding any slice of them
    gives exactly the store's float32 rows for those images; windows and flips are held for the
    epoch's slot only (O(n), not the store's N x R arrays), equal to the store's."""
    store, index = nine_images
    loader = ReplayLoader(store, index, Normalization(16), resolve_backend("cpu"), batch_size=4, num_threads=1)
    try:
        data = loader._read_epoch(1)
        (held,) = data.labels  # one slot (K = 1)
        assert [a.dtype for a in held] == [np.float16] and held[0].shape == (9, store.num_classes)
        ids = loader.images(1)
        slot = loader.slots(1)[0]
        assert np.array_equal(data.ids, ids) and data.slots == [slot]
        assert np.array_equal(store.decode([a[2:7] for a in held]), store.labels(ids[2:7], np.full(5, slot)))
        assert data.windows.shape == (9, 1, 4) and np.array_equal(data.windows[:, 0], store.windows[ids, slot])
        assert data.flips.shape == (9, 1) and np.array_equal(data.flips[:, 0], store.flips[ids, slot])
    finally:
        loader.close()


def test_background_feeds_keep_order_raise_producer_errors_and_stop_early() -> None:
    """The feed thread yields everything in order, re-raises a producer error in the consumer, and a
    consumer that stops early ends the producer (it never runs more than `depth` items ahead)."""
    import threading

    from mealkd.core.dali_io import background

    assert list(background(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in background(failing()):
            got.append(item)
    assert got == [1]

    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    for item in background(counting(), depth=2):
        if item == 3:
            break
    assert len(produced) <= 3 + 2 + 2  # consumed + queued + one in the producer's hand
    assert not any(t.name == "feeds" and t.is_alive() for t in threading.enumerate())
