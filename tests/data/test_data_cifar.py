"""CIFAR python-pickle reader: tarball and extracted folder, exact pixels, CHW order, corruption."""

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spafl.data import cifar, load_dataset
from spafl.data.cifar import load_cifar
from spafl.errors import UserError

from tests.data.fakes import fake_cifar_members, write_fake_cifar


def _extract(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tf.extractall(dest)


def _expected(tarball: Path, which: str):
    """Decode the tarball independently with plain pickle (these are our own generated files)."""
    s = cifar.SPECS[which]
    with tarfile.open(tarball) as tf:
        batches = {Path(m.name).name: pickle.load(tf.extractfile(m), encoding="bytes") for m in tf if m.isfile()}
    def cat(members):
        x = np.concatenate([batches[m][b"data"] for m in members])
        y = np.concatenate([np.asarray(batches[m][s.label_key]) for m in members])
        return x, y
    return cat(s.train_members), cat(s.test_members), batches


@pytest.mark.parametrize("which,ntr,nte", [("cifar10", 23, 7), ("cifar100", 30, 9)])
def test_tarball_round_trip(tmp_path, which, ntr, nte):
    tarball = write_fake_cifar(tmp_path, which, ntr, nte, seed=5)
    assert tarball == tmp_path / cifar.SPECS[which].tarball
    ds = load_cifar(tmp_path, which)
    (xtr, ytr), (xte, yte), batches = _expected(tarball, which)
    assert ds.name == which and ds.num_classes == (10 if which == "cifar10" else 100)
    assert ds.train_x.shape == (ntr, 3, 32, 32) and ds.test_x.shape == (nte, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.is_contiguous()
    np.testing.assert_array_equal(ds.train_x.numpy().reshape(ntr, -1), xtr)
    np.testing.assert_array_equal(ds.test_x.numpy().reshape(nte, -1), xte)
    np.testing.assert_array_equal(ds.train_y.numpy(), ytr)
    np.testing.assert_array_equal(ds.test_y.numpy(), yte)
    # CHW: the row is 1024 R, then 1024 G, then 1024 B values, each row-major.
    i, r, c = 3, 5, 7
    assert int(ds.train_x[i, 0, r, c]) == int(xtr[i, r * 32 + c])
    assert int(ds.train_x[i, 1, r, c]) == int(xtr[i, 1024 + r * 32 + c])
    assert int(ds.train_x[i, 2, r, c]) == int(xtr[i, 2048 + r * 32 + c])
    assert ds.checksums == {tarball.name: hashlib.sha256(tarball.read_bytes()).hexdigest()}
    assert ds.source == str(tmp_path)
    if which == "cifar100":
        # fine labels, not coarse (coarse = fine // 5 in the fakes, so they differ)
        np.testing.assert_array_equal(np.asarray(batches["train"][b"coarse_labels"]), ytr // 5)
        assert ds.train_y.max() >= 20


def test_cifar10_batch_order(tmp_path):
    """Training set = data_batch_1..5 concatenated in order."""
    members = fake_cifar_members("cifar10", 10, 2, seed=1)
    write_fake_cifar(tmp_path, "cifar10", 10, 2, seed=1)
    ds = load_cifar(tmp_path, "cifar10")
    labels = []
    for m in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        labels += pickle.loads(members[m], encoding="bytes")[b"labels"]
    assert ds.train_y.tolist() == labels
    assert [len(pickle.loads(members[f"data_batch_{i}"], encoding="bytes")[b"labels"]) for i in range(1, 6)] == [2] * 5


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_extracted_folder_round_trip(tmp_path, which):
    tarball = write_fake_cifar(tmp_path / "tar", which, 12, 4, seed=2)
    from_tar = load_cifar(tmp_path / "tar", which)
    _extract(tarball, tmp_path / "ext")
    folder = tmp_path / "ext" / cifar.SPECS[which].folder
    for d in (tmp_path / "ext", folder):  # the parent of the folder, or the folder itself
        ds = load_cifar(d, which)
        assert torch.equal(ds.train_x, from_tar.train_x) and torch.equal(ds.test_x, from_tar.test_x)
        assert torch.equal(ds.train_y, from_tar.train_y) and torch.equal(ds.test_y, from_tar.test_y)
        assert ds.source == str(folder)
        for m in cifar.SPECS[which].members:
            key = f"{cifar.SPECS[which].folder}/{m}"
            assert ds.checksums[key] == hashlib.sha256((folder / m).read_bytes()).hexdigest()


def _tar_with(path: Path, which: str, members: dict[str, bytes]) -> None:
    folder = cifar.SPECS[which].folder
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_hand_made_planes_python3_pickle(tmp_path):
    """A batch pickled by Python 3's own pickler (bytes as _codecs.encode) with known R/G/B planes."""
    n = 2
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, :1024] = 10
    data[:, 1024:2048] = 20
    data[:, 2048:] = 30
    data[1, 1024 + 31 * 32 + 0] = 99  # G plane, bottom-left pixel of image 1
    batch = pickle.dumps({b"data": data, b"labels": [4, 8]}, protocol=2)
    members = {m: batch for m in cifar.SPECS["cifar10"].members}
    _tar_with(tmp_path / "cifar-10-python.tar.gz", "cifar10", members)
    ds = load_cifar(tmp_path, "cifar10")
    assert ds.train_x.shape == (10, 3, 32, 32)
    assert ds.train_x[0, 0].unique().tolist() == [10]
    assert ds.train_x[0, 1].unique().tolist() == [20]
    assert ds.train_x[0, 2].unique().tolist() == [30]
    assert int(ds.train_x[1, 1, 31, 0]) == 99 and int(ds.train_x[1, 1, 0, 31]) == 20
    assert ds.test_y.tolist() == [4, 8]


def test_truncated_tarball(tmp_path):
    tarball = write_fake_cifar(tmp_path, "cifar10", 20, 5)
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_cifar(tmp_path, "cifar10")


def test_tarball_missing_member(tmp_path):
    members = fake_cifar_members("cifar10", 10, 2)
    del members["test_batch"]
    _tar_with(tmp_path / "cifar-10-python.tar.gz", "cifar10", members)
    with pytest.raises(UserError, match="lacks cifar-10-batches-py/test_batch"):
        load_cifar(tmp_path, "cifar10")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_foreign_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    members = fake_cifar_members("cifar100", 5, 5)
    (folder / "train").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    (folder / "test").write_bytes(members["test"])
    with pytest.raises(UserError, match=r"cifar-100-python/train: not a valid CIFAR python batch"):
        load_cifar(tmp_path, "cifar100")
    assert not (tmp_path / "pwned").exists()


def test_wrong_contents(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    members = fake_cifar_members("cifar10", 10, 2)
    for m, payload in members.items():
        (folder / m).write_bytes(payload)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(UserError, match=r"data_batch_3: b'data' is uint8 \(2, 100\)"):
        load_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(UserError, match=r"data_batch_3: labels outside 0..9"):
        load_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_3: not a valid CIFAR python batch"):
        load_cifar(tmp_path, "cifar10")


def test_other_variant_not_found(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", 10, 2)
    with pytest.raises(UserError, match=r"cifar100 files not found .*cifar-100-python.tar.gz"):
        load_cifar(tmp_path, "cifar100")


def test_load_dataset_with_data_dir(tmp_path):
    write_fake_cifar(tmp_path, "cifar100", 10, 3, seed=4)
    ds = load_dataset("cifar100", str(tmp_path), download=False)
    assert ds.name == "cifar100" and ds.train_x.shape == (10, 3, 32, 32) and ds.image_shape == (3, 32, 32)


def test_verify_tarball(tmp_path, monkeypatch):
    tarball = write_fake_cifar(tmp_path, "cifar10", 10, 2)
    with pytest.raises(UserError, match="SHA-256 .* does not match the official"):
        cifar.verify_tarball(tarball, "cifar10")
    content = tarball.read_bytes()
    monkeypatch.setitem(cifar.TARBALL_SHA256, "cifar10", hashlib.sha256(content).hexdigest())
    with pytest.raises(UserError, match="MD5"):
        cifar.verify_tarball(tarball, "cifar10")
    monkeypatch.setitem(cifar.TARBALL_MD5, "cifar10", hashlib.md5(content, usedforsecurity=False).hexdigest())
    cifar.verify_tarball(tarball, "cifar10")


def test_official_checksum_constants():
    assert cifar.TARBALL_SHA256["cifar10"] == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    assert cifar.TARBALL_SHA256["cifar100"] == "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    assert cifar.TARBALL_MD5 == {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}
