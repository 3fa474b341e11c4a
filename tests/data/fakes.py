"""Fake data files in the official formats, for tests: Fashion-MNIST IDX .gz files and CIFAR python tarballs.

Images are random uint8, labels balanced (as :func:`spafl.data.synthetic.balanced_labels`).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np

from spafl.data import cifar, fmnist
from spafl.data.synthetic import balanced_labels


def write_idx(path: str | os.PathLike, array: np.ndarray, compresslevel: int = 1) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (the official Fashion-MNIST format)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    Path(path).write_bytes(gzip.compress(header + array.tobytes(), compresslevel=compresslevel))


def _fake_arrays(n: int, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = balanced_labels(rng, n, num_classes)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return x, y


def write_fake_fmnist(directory: str | os.PathLike, num_train: int, num_test: int, seed: int = 0) -> Path:
    """Write the four Fashion-MNIST IDX .gz files (random 28×28 images, balanced labels) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n, images, labels in ((num_train, fmnist.TRAIN_IMAGES, fmnist.TRAIN_LABELS), (num_test, fmnist.TEST_IMAGES, fmnist.TEST_LABELS)):
        x, y = _fake_arrays(n, (28, 28), fmnist.NUM_CLASSES, rng)
        write_idx(d / images, x)
        write_idx(d / labels, y.astype(np.uint8))
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
