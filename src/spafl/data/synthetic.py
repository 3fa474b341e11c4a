"""Generated data: a small learnable in-memory dataset, and fake files in the official formats for tests."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from spafl.data import cifar, fmnist
from spafl.data.datasets import Dataset
from spafl.errors import UserError

NOISE = 80  # noise half-width in pixel units: pixel = clip(prototype + U[-NOISE, NOISE])


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Balanced labels (class counts differ by at most one), in random order."""
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


def _images(rng: np.random.Generator, prototypes: np.ndarray, y: np.ndarray) -> np.ndarray:
    noise = rng.integers(-NOISE, NOISE + 1, size=(y.size, *prototypes.shape[1:]), dtype=np.int16)
    return np.clip(prototypes[y] + noise, 0, 255).astype(np.uint8)


def synthetic_dataset(
    num_train: int = 2000,
    num_test: int = 500,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """One fixed random uint8 prototype per class plus bounded uniform noise; deterministic in ``seed``.

    Classes are balanced. A linear classifier separates them well above chance.
    """
    for what, v, lo in (("num_train", num_train, 1), ("num_test", num_test, 0), ("num_classes", num_classes, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise UserError(f"synthetic dataset: {what} must be an integer >= {lo}, got {v!r}")
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise UserError(f"synthetic dataset: image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
    shape = tuple(int(s) for s in image_shape)
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(num_classes, *shape), dtype=np.int16)
    ytr = _labels(rng, num_train, num_classes)
    xtr = _images(rng, prototypes, ytr)
    yte = _labels(rng, num_test, num_classes)
    xte = _images(rng, prototypes, yte)
    return Dataset(
        name="synthetic",
        train_x=torch.from_numpy(xtr), train_y=torch.from_numpy(ytr),
        test_x=torch.from_numpy(xte), test_y=torch.from_numpy(yte),
        num_classes=num_classes, source="generated", checksums={},
    )


def _fake_arrays(n: int, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(rng, n, num_classes)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return x, y


def write_fake_fmnist(directory: str | os.PathLike, num_train: int, num_test: int, seed: int = 0) -> Path:
    """Write the four Fashion-MNIST IDX .gz files (random 28×28 images, balanced labels) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n, images, labels in ((num_train, fmnist.TRAIN_IMAGES, fmnist.TRAIN_LABELS), (num_test, fmnist.TEST_IMAGES, fmnist.TEST_LABELS)):
        x, y = _fake_arrays(n, (28, 28), fmnist.NUM_CLASSES, rng)
        fmnist.write_idx(d / images, x)
        fmnist.write_idx(d / labels, y.astype(np.uint8))
    return d


class _Py2StylePickler(pickle._Pickler):
    """Pickle protocol 2 as Python 2 wrote it: bytes and ASCII str as BINSTRING.

    The official CIFAR files were written by Python 2, where every string is
    a byte string; under ``encoding="bytes"`` they load as ``bytes``
    (dict keys, numpy's dtype arguments). Python 3's own protocol-2 pickler
    writes bytes as ``_codecs.encode(...)`` calls instead, which the official
    files never contain.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_binstring(self, payload: bytes, obj) -> None:
        n = len(payload)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + payload)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + payload)
        self.memoize(obj)

    def save_bytes(self, obj: bytes) -> None:
        self._save_binstring(obj, obj)

    def save_str(self, obj: str) -> None:
        if obj.isascii():
            self._save_binstring(obj.encode("ascii"), obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _pickle_like_official(obj: dict) -> bytes:
    """Pickle ``obj`` the way the official (Python 2, numpy 1.x era) CIFAR files are pickled."""
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # Globals are written as text ("c<module>\n<name>\n"); use the module
    # path numpy 1.x wrote, as in the official files.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _add(tf: tarfile.TarFile, name: str, payload: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = int(mtime)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(payload))


def fake_cifar_members(which: str, num_train: int, num_test: int, seed: int = 0) -> dict[str, bytes]:
    """Member file name -> pickled content of a fake CIFAR dataset in the official python format."""
    s = cifar.spec(which)
    rng = np.random.default_rng(seed)
    xtr, ytr = _fake_arrays(num_train, (cifar.ROW,), s.num_classes, rng)
    xte, yte = _fake_arrays(num_test, (cifar.ROW,), s.num_classes, rng)
    members: dict[str, bytes] = {}

    def names(prefix: str, n: int) -> list[bytes]:
        return [f"{prefix}_{i:05d}.png".encode() for i in range(n)]

    if which == "cifar10":
        chunks = np.array_split(np.arange(num_train), len(s.train_members))
        for i, (m, idx) in enumerate(zip(s.train_members, chunks), start=1):
            members[m] = _pickle_like_official({
                b"batch_label": f"training batch {i} of 5".encode(), b"labels": ytr[idx].tolist(),
                b"data": xtr[idx], b"filenames": names(m, idx.size),
            })
        members["test_batch"] = _pickle_like_official({
            b"batch_label": b"testing batch 1 of 1", b"labels": yte.tolist(), b"data": xte,
            b"filenames": names("test", num_test),
        })
        members["batches.meta"] = _pickle_like_official({
            b"label_names": [f"class{c}".encode() for c in range(10)], b"num_cases_per_batch": 10000, b"num_vis": cifar.ROW,
        })
    else:
        for m, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            members[m] = _pickle_like_official({
                b"filenames": names(m, y.size), b"batch_label": f"{m}ing batch 1 of 1".encode(),
                b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(), b"data": x,
            })
        members["meta"] = _pickle_like_official({
            b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
            b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)],
        })
    return members


def write_fake_cifar(directory: str | os.PathLike, which: str, num_train: int, num_test: int, seed: int = 0) -> Path:
    """Write ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` in the official format; return its path.

    CIFAR-10: ``data_batch_1..5`` (splitting ``num_train``), ``test_batch``,
    ``batches.meta``; CIFAR-100: ``train``, ``test``, ``meta`` with
    ``b"fine_labels"`` and ``b"coarse_labels"`` (= fine // 5). Images are random.
    """
    s = cifar.spec(which)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    members = fake_cifar_members(which, num_train, num_test, seed)
    path = d / s.tarball
    now = time.time()
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        dir_info = tarfile.TarInfo(s.folder)
        dir_info.type = tarfile.DIRTYPE
        dir_info.mode = 0o755
        dir_info.mtime = int(now)
        tf.addfile(dir_info)
        for name, payload in members.items():
            _add(tf, f"{s.folder}/{name}", payload, now)
    return path
