"""CIFAR-10 / CIFAR-100: reader for the official python-pickle format.

Each batch file is a pickled dict with ``b"data"``: uint8 ``[n, 3072]`` whose
rows are 1024 red, then 1024 green, then 1024 blue values, each plane in
row-major order, i.e. already CHW: ``reshape(n, 3, 32, 32)`` is correct (no
transpose). Labels are ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100). Files are read from the official tarball or from its extracted
folder.

The pickles are loaded with an unpickler that only resolves the numpy
callables an array needs, so a planted batch file cannot run arbitrary code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spafl.data.datasets import Dataset
from spafl.errors import UserError


@dataclass(frozen=True)
class CifarSpec:
    tarball: str
    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    label_key: bytes
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        return self.train_members + self.test_members


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        tarball="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)), test_members=("test_batch",),
        label_key=b"labels", num_classes=10,
    ),
    "cifar100": CifarSpec(
        tarball="cifar-100-python.tar.gz", folder="cifar-100-python",
        train_members=("train",), test_members=("test",),
        label_key=b"fine_labels", num_classes=100,
    ),
}

# Checksums of the official tarballs.
# MD5: published on https://www.cs.toronto.edu/~kriz/cifar.html.
# SHA-256: the `file_hash` values in Keras' `keras/datasets/cifar10.py` and
# `cifar100.py` (also torchvision's prototype dataset `_SHA256` for CIFAR-100),
# each cross-checked against several independent provenance records that give
# the same SHA-256 together with the published MD5 and the file size
# (170,498,071 and 169,001,437 bytes).
TARBALL_SHA256: dict[str, str] = {
    "cifar10": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    "cifar100": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
}
TARBALL_MD5: dict[str, str] = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}

IMAGE_SHAPE = (3, 32, 32)
ROW = 3 * 32 * 32


def spec(which: str) -> CifarSpec:
    if which not in SPECS:
        raise UserError(f"unknown CIFAR variant {which!r}; choose cifar10 or cifar100")
    return SPECS[which]


def resolve(directory: str | os.PathLike, which: str) -> tuple[str, Path] | None:
    """Where in ``directory`` the data is: ``("folder", path)`` for an extracted folder, ``("tarball", path)``.

    Looks for, in order: the extracted folder ``directory/<folder>/``, the
    member files directly in ``directory``, the tarball ``directory/<tarball>``.
    """
    s = spec(which)
    base = Path(directory)
    for cand in (base / s.folder, base):
        if all((cand / m).is_file() for m in s.members):
            return ("folder", cand)
    if (base / s.tarball).is_file():
        return ("tarball", base / s.tarball)
    return None


def expected_files(which: str) -> str:
    s = spec(which)
    return f"{s.tarball} or the extracted folder {s.folder}/ ({', '.join(s.members)})"


# -- safe unpickling ---------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.uint8(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {}
    for fn in (reconstruct, scalar):
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, fn.__name__)] = fn
    frombuffer = np.empty(1).__reduce_ex__(5)[0]
    if callable(frombuffer) and getattr(frombuffer, "__name__", "") == "_frombuffer":
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes at pickle protocol <= 2 as _codecs.encode(str, "latin1").
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED = _allowed_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any decoding failure of an untrusted file is a user-side problem
        raise UserError(f"{where}: not a valid CIFAR python batch ({type(e).__name__}: {e}); the file is corrupt") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a valid CIFAR python batch (holds {type(obj).__name__}, expected a dict)")
    return obj


def _get(d: dict, key: bytes):
    if key in d:
        return d[key]
    return d.get(key.decode())


def _decode_batch(d: dict, label_key: bytes, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = _get(d, b"data"), _get(d, label_key)
    if data is None or labels is None:
        raise UserError(f"{where}: CIFAR batch lacks the keys b'data' and {label_key!r}; wrong file or wrong dataset")
    try:
        data = np.asarray(data)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: b'data' or {label_key!r} has the wrong type ({e}); wrong or corrupt file") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        raise UserError(f"{where}: b'data' is {data.dtype} {data.shape}, expected uint8 [n, {ROW}]")
    if labels.shape[0] != data.shape[0]:
        raise UserError(f"{where}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where}: labels outside 0..{num_classes - 1}; wrong dataset (cifar10 vs cifar100?)")
    return data, labels


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_tarball(path: Path, s: CifarSpec) -> tuple[dict[str, bytes], str]:
    """The wanted member files of the tarball, and the tarball's SHA-256."""
    wanted = {f"{s.folder}/{m}": m for m in s.members}
    found: dict[str, bytes] = {}
    digest = _sha256_file(path)
    try:
        with tarfile.open(path, "r:gz") as tf:
            # Sequential iteration: no backward seeks in the gzip stream.
            for member in tf:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in wanted and member.isfile():
                    f = tf.extractfile(member)
                    assert f is not None
                    found[wanted[name]] = f.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read the tarball ({e}); it is truncated or corrupt: delete it and get it again") from None
    missing = [f"{s.folder}/{m}" for m in s.members if m not in found]
    if missing:
        raise UserError(f"{path}: tarball lacks {', '.join(missing)}; is it the official {s.tarball}?")
    return found, digest


def load_cifar(directory: str | os.PathLike, which: str) -> Dataset:
    """Read CIFAR-10 (``which="cifar10"``) or CIFAR-100 from ``directory``.

    ``checksums`` holds the SHA-256 of the tarball, or of each member file when
    read from an extracted folder.
    """
    s = spec(which)
    found = resolve(directory, which)
    if found is None:
        raise UserError(f"{which} files not found in {directory}; expected {expected_files(which)}")
    kind, path = found
    checksums: dict[str, str] = {}
    if kind == "tarball":
        raw, checksums[path.name] = _read_tarball(path, s)
        where = {m: f"{path}:{s.folder}/{m}" for m in s.members}
    else:
        raw = {}
        for m in s.members:
            try:
                raw[m] = (path / m).read_bytes()
            except OSError as e:
                raise UserError(f"cannot read {path / m}: {e.strerror or e}") from None
            checksums[f"{s.folder}/{m}"] = hashlib.sha256(raw[m]).hexdigest()
        where = {m: str(path / m) for m in s.members}

    def split(members: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for m in members:
            x, y = _decode_batch(_unpickle(raw.pop(m), where[m]), s.label_key, s.num_classes, where[m])
            xs.append(x)
            ys.append(y)
        x = np.concatenate(xs) if len(xs) > 1 else xs[0]
        y = np.concatenate(ys) if len(ys) > 1 else ys[0]
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:
            x = x.copy()
        # Rows are already channel-major (R plane, G plane, B plane): CHW.
        return torch.from_numpy(x.reshape(-1, *IMAGE_SHAPE)), torch.from_numpy(np.ascontiguousarray(y))

    train_x, train_y = split(s.train_members)
    test_x, test_y = split(s.test_members)
    return Dataset(
        name=which, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        num_classes=s.num_classes, source=str(path.parent if kind == "tarball" else path), checksums=checksums,
    )


def verify_tarball(path: str | os.PathLike, which: str) -> None:
    """Check a downloaded tarball against the official SHA-256 and MD5; UserError on mismatch."""
    path = Path(path)
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    name = spec(which).tarball
    if sha.hexdigest() != TARBALL_SHA256[which]:
        raise UserError(f"{name}: SHA-256 {sha.hexdigest()} does not match the official {TARBALL_SHA256[which]}")
    if md5.hexdigest() != TARBALL_MD5[which]:
        raise UserError(f"{name}: MD5 {md5.hexdigest()} does not match the official {TARBALL_MD5[which]}")
