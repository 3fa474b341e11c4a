"""Fashion-MNIST IDX reader: exact round trips, corruption errors, the real files."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from spafl.data import fmnist
from spafl.data.fmnist import FILES, load_fmnist
from spafl.errors import UserError

from tests.data.fakes import write_fake_fmnist, write_idx

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_all(d: Path, xtr, ytr, xte, yte) -> None:
    d.mkdir(parents=True, exist_ok=True)
    write_idx(d / fmnist.TRAIN_IMAGES, xtr)
    write_idx(d / fmnist.TRAIN_LABELS, ytr)
    write_idx(d / fmnist.TEST_IMAGES, xte)
    write_idx(d / fmnist.TEST_LABELS, yte)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    return (
        rng.integers(0, 256, (13, 28, 28), dtype=np.uint8), rng.integers(0, 10, 13).astype(np.uint8),
        rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5).astype(np.uint8),
    )


def test_round_trip_exact(tmp_path, arrays):
    xtr, ytr, xte, yte = arrays
    _write_all(tmp_path, *arrays)
    ds = load_fmnist(tmp_path)
    assert ds.name == "fmnist" and ds.num_classes == 10
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (13, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_x.is_contiguous() and ds.test_x.is_contiguous()
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), xtr)
    np.testing.assert_array_equal(ds.train_y.numpy(), ytr.astype(np.int64))
    np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), xte)
    np.testing.assert_array_equal(ds.test_y.numpy(), yte.astype(np.int64))
    assert ds.image_shape == (1, 28, 28)
    assert ds.source == str(tmp_path)
    for f in FILES:
        assert ds.checksums[f] == hashlib.sha256((tmp_path / f).read_bytes()).hexdigest()


def test_hand_built_idx_bytes(tmp_path):
    """Headers written byte by byte (not by write_idx): the reader puts pixel (n, row, col) where the format says."""
    images = bytes(range(2 * 3 * 4))  # 2 images of 3 rows x 4 cols, values 0..23
    img_file = b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + images
    lab_file = b"\x00\x00\x08\x01" + struct.pack(">I", 2) + bytes([9, 4])
    for name, payload in ((fmnist.TRAIN_IMAGES, img_file), (fmnist.TEST_IMAGES, img_file),
                          (fmnist.TRAIN_LABELS, lab_file), (fmnist.TEST_LABELS, lab_file)):
        (tmp_path / name).write_bytes(gzip.compress(payload))
    ds = load_fmnist(tmp_path)
    assert ds.train_x.shape == (2, 1, 3, 4)
    assert int(ds.train_x[1, 0, 2, 1]) == 12 + 2 * 4 + 1
    assert int(ds.train_x[0, 0, 0, 3]) == 3
    assert ds.train_y.tolist() == [9, 4]


def test_subfolder_accepted(tmp_path, arrays):
    _write_all(tmp_path / "fashion-mnist", *arrays)
    ds = load_fmnist(tmp_path)
    assert ds.source == str(tmp_path / "fashion-mnist")
    assert ds.train_x.shape[0] == 13


def test_write_fake_fmnist_matches_independent_parse(tmp_path):
    write_fake_fmnist(tmp_path, 40, 10, seed=3)
    ds = load_fmnist(tmp_path)
    raw = gzip.decompress((tmp_path / fmnist.TRAIN_IMAGES).read_bytes())
    assert raw[:4] == b"\x00\x00\x08\x03" and struct.unpack(">III", raw[4:16]) == (40, 28, 28)
    expect = np.frombuffer(raw, np.uint8, offset=16).reshape(40, 28, 28)
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), expect)
    labels = gzip.decompress((tmp_path / fmnist.TEST_LABELS).read_bytes())
    assert labels[:8] == b"\x00\x00\x08\x01" + struct.pack(">I", 10)
    assert ds.test_y.tolist() == list(labels[8:])
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [4] * 10


def test_truncated_gzip_names_file(tmp_path, arrays):
    _write_all(tmp_path, *arrays)
    p = tmp_path / fmnist.TRAIN_IMAGES
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(UserError, match=fmnist.TRAIN_IMAGES):
        load_fmnist(tmp_path)


def test_truncated_idx_payload(tmp_path, arrays):
    _write_all(tmp_path, *arrays)
    raw = gzip.decompress((tmp_path / fmnist.TEST_IMAGES).read_bytes())
    (tmp_path / fmnist.TEST_IMAGES).write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        load_fmnist(tmp_path)


def test_bad_magic(tmp_path, arrays):
    xtr, ytr, xte, yte = arrays
    _write_all(tmp_path, xtr, ytr, xte, yte)
    write_idx(tmp_path / fmnist.TRAIN_LABELS, xtr)  # an idx3 file where idx1 labels belong
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        load_fmnist(tmp_path)


def test_not_gzip(tmp_path, arrays):
    _write_all(tmp_path, *arrays)
    (tmp_path / fmnist.TEST_LABELS).write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz.*gzip"):
        load_fmnist(tmp_path)


def test_count_mismatch_and_label_range(tmp_path, arrays):
    xtr, ytr, xte, yte = arrays
    _write_all(tmp_path, xtr, ytr[:-1], xte, yte)
    with pytest.raises(UserError, match="13 images but .* 12 labels"):
        load_fmnist(tmp_path)
    bad = ytr.copy()
    bad[0] = 10
    _write_all(tmp_path, xtr, bad, xte, yte)
    with pytest.raises(UserError, match="label 10 out of range"):
        load_fmnist(tmp_path)


def test_missing_file(tmp_path, arrays):
    _write_all(tmp_path, *arrays)
    (tmp_path / fmnist.TEST_LABELS).unlink()
    assert fmnist.find_dir(tmp_path) is None
    with pytest.raises(UserError, match="expected: .*t10k-labels-idx1-ubyte.gz"):
        load_fmnist(tmp_path)


def test_verify_file_rejects_non_official(tmp_path, arrays):
    _write_all(tmp_path, *arrays)
    with pytest.raises(UserError, match="does not match the official"):
        fmnist.verify_file(tmp_path / fmnist.TRAIN_LABELS)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_fmnist(REAL_DIR)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    for f in FILES:
        content = gzip.decompress((REAL_DIR / f).read_bytes())
        assert hashlib.sha256(content).hexdigest() == fmnist.DECOMPRESSED_SHA256[f]
    for f in (fmnist.TRAIN_LABELS, fmnist.TEST_LABELS):
        fmnist.verify_file(REAL_DIR / f)  # must not raise
    # The first training image of the official set is an ankle boot (label 9).
    assert int(ds.train_y[0]) == 9 and int(ds.test_y[0]) == 9
