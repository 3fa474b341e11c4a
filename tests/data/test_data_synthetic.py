"""Generated data: the in-memory synthetic dataset and the fake official-format files."""

import pickle
import tarfile

import numpy as np
import pytest
import torch

from spafl.data import DATASETS, Dataset, load_dataset, synthetic_dataset
from spafl.data.fmnist import load_fmnist
from spafl.errors import UserError

from tests.data.fakes import fake_cifar_members, write_fake_cifar, write_fake_fmnist


def test_datasets_tuple():
    assert DATASETS == ("fmnist", "cifar10", "cifar100", "synthetic")


def test_synthetic_defaults_and_determinism():
    a = synthetic_dataset()
    assert isinstance(a, Dataset) and a.name == "synthetic" and a.source == "generated" and a.checksums == {}
    assert a.train_x.shape == (2000, 1, 28, 28) and a.test_x.shape == (500, 1, 28, 28)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert a.num_classes == 10 and a.image_shape == (1, 28, 28)
    assert torch.bincount(a.train_y).tolist() == [200] * 10 and torch.bincount(a.test_y).tolist() == [50] * 10
    b = load_dataset("synthetic")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    c = synthetic_dataset(seed=1)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_shapes():
    d = synthetic_dataset(num_train=30, num_test=7, image_shape=(3, 8, 9), num_classes=4, seed=2)
    assert d.train_x.shape == (30, 3, 8, 9) and d.test_x.shape == (7, 3, 8, 9) and d.num_classes == 4
    assert int(d.train_y.max()) == 3
    with pytest.raises(UserError, match="num_train must be an integer >= 1"):
        synthetic_dataset(num_train=0)
    with pytest.raises(UserError, match="image_shape"):
        synthetic_dataset(image_shape=(28, 28))


def test_synthetic_is_linearly_learnable():
    d = synthetic_dataset()
    xtr = d.train_x.reshape(2000, -1).double() / 255
    xte = d.test_x.reshape(500, -1).double() / 255
    xtr = torch.cat([xtr, torch.ones(2000, 1, dtype=torch.float64)], 1)
    xte = torch.cat([xte, torch.ones(500, 1, dtype=torch.float64)], 1)
    onehot = torch.nn.functional.one_hot(d.train_y, 10).double()
    # ridge regression onto one-hot targets
    w = torch.linalg.solve(xtr.T @ xtr + 1.0 * torch.eye(xtr.shape[1], dtype=torch.float64), xtr.T @ onehot)
    acc = (xte @ w).argmax(1).eq(d.test_y).double().mean().item()
    assert acc > 0.9, acc


def test_fake_fmnist_files(tmp_path):
    write_fake_fmnist(tmp_path, 25, 11, seed=1)
    ds = load_fmnist(tmp_path)
    assert ds.train_x.shape == (25, 1, 28, 28) and ds.test_x.shape == (11, 1, 28, 28)
    again = tmp_path / "again"
    write_fake_fmnist(again, 25, 11, seed=1)
    assert torch.equal(load_fmnist(again).train_x, ds.train_x)


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_fake_cifar_looks_official(tmp_path, which):
    path = write_fake_cifar(tmp_path, which, 20, 5)
    with tarfile.open(path) as tf:
        names = sorted(m.name for m in tf if m.isfile())
    if which == "cifar10":
        assert names == sorted([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
                               + ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"])
    else:
        assert names == ["cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"]
    members = fake_cifar_members(which, 20, 5)
    batch = members["test_batch" if which == "cifar10" else "test"]
    # Python-2 style: numpy 1.x module path, byte strings written directly (no _codecs.encode)
    assert b"cnumpy.core.multiarray\n_reconstruct" in batch and b"_codecs" not in batch
    d = pickle.loads(batch, encoding="bytes")
    assert all(isinstance(k, bytes) for k in d)
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (5, 3072)
    if which == "cifar100":
        assert set(d) >= {b"fine_labels", b"coarse_labels", b"data", b"filenames", b"batch_label"}
        meta = pickle.loads(members["meta"], encoding="bytes")
        assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20
