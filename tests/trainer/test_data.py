"""Embedded datasets, the user folder layouts, bad data, and the step-indexed batch order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import Batches, BatchOrder, DataError, load_dataset


def _png(path, size=(20, 16), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3 if mode == "RGB" else 1), value, np.uint8)
    Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode).save(path)


@pytest.mark.parametrize("name,kind,channels,n_train,classes", [
    ("mnist", "images", 1, 4000, 10), ("digits", "images", 1, 1437, 10),
    ("shapes", "paired", 3, 2000, 0), ("stripes", "unpaired", 3, 2000, 0)])
def test_embedded_datasets(name, kind, channels, n_train, classes):
    ds = load_dataset(name, kind, 32)
    assert ds.info.kind == kind and ds.info.channels == channels and ds.info.num_classes == classes
    assert ds.train[0].shape == (n_train, channels, 32, 32) and ds.train[0].dtype == torch.uint8
    assert len(ds.test[0]) > 0, "every embedded set has a held-out split"
    if kind == "images":
        assert set(ds.test[1].tolist()) == set(range(10)), "held-out split covers every class"
    if kind == "paired":
        assert not torch.equal(ds.train[0][0], ds.train[1][0])


def test_embedded_default_and_other_sizes():
    assert load_dataset(None, "images", 32).source == "mnist"
    assert load_dataset("shapes", "paired", 64).train[0].shape[-1] == 64


def test_class_folders_give_labels_and_detect_greyscale(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        for i in range(6):
            _png(tmp_path / cls / f"{i}.png", mode="L", value=value)
    ds = load_dataset(str(tmp_path), "images", 32)
    assert ds.info.class_names == ("cat", "dog") and ds.info.channels == 1
    x, y = torch.cat([ds.train[0], ds.test[0]]), torch.cat([ds.train[1], ds.test[1]])
    assert x.shape[1:] == (1, 32, 32) and sorted(y.tolist()) == [0] * 6 + [1] * 6
    assert all(int(x[i].float().mean()) == (10 if y[i] == 0 else 200) for i in range(len(x)))


def test_flat_folder_is_unlabelled_rgb(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.jpg", size=(40, 30))
    ds = load_dataset(str(tmp_path), "images", 32, channels=None)
    assert ds.info.class_names == () and ds.info.channels == 3 and ds.train[0].shape == (3, 3, 32, 32)


def test_aligned_pairs_and_direction(tmp_path):
    for split in ("train", "test"):
        for i in range(3):
            arr = np.zeros((32, 64, 3), np.uint8)
            arr[:, 32:] = 255  # A black, B white
            Image.fromarray(arr).save((tmp_path / split).mkdir(exist_ok=True) or tmp_path / split / f"{i}.png")
    ab = load_dataset(str(tmp_path), "paired", 32, direction="AtoB")
    assert ab.train[0].max() == 0 and ab.train[1].min() == 255 and len(ab.test[0]) == 3
    ba = load_dataset(str(tmp_path), "paired", 32, direction="BtoA")
    assert ba.train[0].min() == 255 and ba.test[1].max() == 0


def test_unaligned_domains(tmp_path):
    for sub, n in (("trainA", 3), ("trainB", 5), ("testA", 1), ("testB", 2)):
        for i in range(n):
            _png(tmp_path / sub / f"{i}.png")
    ds = load_dataset(str(tmp_path), "unpaired", 32)
    assert [len(t) for t in ds.train + ds.test] == [3, 5, 1, 2]


@pytest.mark.parametrize("setup,kind,match", [
    (lambda p: None, "images", "no such folder"),
    (lambda p: p.mkdir(), "images", "no images found"),
    (lambda p: (p / "a").mkdir(parents=True), "images", "class folder has no images"),
    (lambda p: (p.mkdir(), (p / "x.png").write_bytes(b"not an image")), "images", r"x\.png: cannot read"),
    (lambda p: _png(p / "train" / "0.png", size=(33, 16)), "paired", r"0\.png: width 33 is odd"),
    (lambda p: p.mkdir(), "paired", "no train/ folder"),
    (lambda p: _png(p / "trainA" / "0.png"), "unpaired", "no trainB/ folder"),
    (lambda p: (_png(p / "a" / "0.png"), _png(p / "1.png")), "images", "both images and sub-folders"),
])
def test_bad_data_names_the_problem(tmp_path, setup, kind, match):
    path = tmp_path / "data"
    setup(path)
    with pytest.raises(DataError, match=match):
        load_dataset(str(path), kind, 32)


def test_batch_order_is_a_function_of_step_and_covers_each_epoch():
    order = BatchOrder(10, 4, seed=3)
    first_epoch = torch.cat([order.indices(s) for s in range(5)])[:20]
    assert sorted(first_epoch[:10].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=3).indices(7), order.indices(7))
    ranks = [BatchOrder(10, 2, seed=3, rank=r, world=2).indices(0) for r in (0, 1)]
    assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist())


def test_paired_flip_keeps_pairs_aligned():
    ds = load_dataset("shapes", "paired", 32)
    a, b = Batches(ds, 16, seed=0, device=torch.device("cpu"), flip=True)(0)
    a0, b0 = Batches(ds, 16, seed=0, device=torch.device("cpu"), flip=False)(0)
    flipped = [not torch.equal(a[i], a0[i]) for i in range(16)]
    assert any(flipped) and not all(flipped)
    for i in range(16):
        assert torch.equal(b[i], b0[i].flip(-1) if flipped[i] else b0[i])
