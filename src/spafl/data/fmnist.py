"""Fashion-MNIST: reader for the official gzip-compressed IDX files (the writer tests use: tests/data/fakes.py).

IDX layout (big-endian): two zero bytes, one type byte (0x08 = uint8), one
byte with the number of dimensions d, then d uint32 sizes, then the data in
C order. Images are ``idx3`` (N, rows, cols), labels ``idx1`` (N,).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from spafl.data.datasets import Dataset
from spafl.errors import UserError

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# Name of the subfolder a directory may hold the files in (Debian's layout,
# and where downloads go).
SUBDIR = "fashion-mnist"

NUM_CLASSES = 10

# SHA-256 of the *decompressed* official files. Compressed hashes differ
# between sources (Debian re-gzips them); the decompressed IDX bytes do not.
DECOMPRESSED_SHA256: dict[str, str] = {
    TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}

IDX_MAGIC_IMAGES = 0x00000803  # uint8, 3 dims
IDX_MAGIC_LABELS = 0x00000801  # uint8, 1 dim


def find_dir(directory: str | os.PathLike) -> Path | None:
    """The folder holding all four files: ``directory`` itself or its ``fashion-mnist/``; None if neither."""
    base = Path(directory)
    for cand in (base, base / SUBDIR):
        if all((cand / f).is_file() for f in FILES):
            return cand
    return None


def gunzip(raw: bytes, chunk: int = 1 << 20) -> bytes:
    """Decompress gzip data (all members; CRC checked), feeding the input in chunks (faster than one shot).

    Raises EOFError on truncated input and zlib.error on corrupt input.
    """
    parts = []
    view = memoryview(raw)
    pos = 0
    while True:
        d = zlib.decompressobj(wbits=31)
        while not d.eof and pos < len(view):
            parts.append(d.decompress(view[pos:pos + chunk]))
            pos += chunk
        if not d.eof:
            raise EOFError("compressed data ended before the end-of-stream marker")
        rest = bytes(d.unused_data) + bytes(view[pos:])
        rest = rest.lstrip(b"\x00")  # gzip allows zero padding after a member
        if not rest:
            break
        view, pos = memoryview(rest), 0
    return b"".join(parts)


def _decompress(path: Path) -> tuple[bytes, bytes]:
    """Return (compressed bytes, decompressed bytes) of a .gz file; UserError on a broken file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = gunzip(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{path} is not a valid gzip file ({e}); it is truncated or corrupt: delete it and provide/download it again"
        ) from None
    return raw, data


def parse_idx(data: bytes, expected_magic: int, where: str | os.PathLike) -> np.ndarray:
    """Parse decompressed IDX bytes of unsigned bytes; check the magic number and the size.

    ``where`` names the file in error messages.
    """
    if len(data) < 4:
        raise UserError(f"{where}: only {len(data)} bytes, too short for an IDX header; the file is truncated or corrupt")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise UserError(
            f"{where}: bad IDX magic number 0x{magic:08x} (expected 0x{expected_magic:08x}); "
            "the file is corrupt or not the right Fashion-MNIST file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{where}: IDX header is truncated ({len(data)} bytes, need {header})")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        raise UserError(
            f"{where}: IDX header announces shape {tuple(dims)} = {expected} bytes of data but the file holds {actual}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_split(folder: Path, images_name: str, labels_name: str, checksums: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = []
    for name, magic in ((images_name, IDX_MAGIC_IMAGES), (labels_name, IDX_MAGIC_LABELS)):
        path = folder / name
        raw, data = _decompress(path)
        checksums[name] = hashlib.sha256(raw).hexdigest()
        arrays.append(parse_idx(data, magic, path))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{folder / images_name} holds {images.shape[0]} images but {folder / labels_name} holds "
            f"{labels.shape[0]} labels; the files do not belong together"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise UserError(f"{folder / labels_name}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    x = torch.from_numpy(images.copy()).unsqueeze(1).contiguous()  # [N, 1, H, W]
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_fmnist(directory: str | os.PathLike) -> Dataset:
    """Read the four IDX .gz files from ``directory`` (or its ``fashion-mnist/`` subfolder).

    Files are not rejected for a hash mismatch (any valid IDX files are read);
    ``checksums`` records the SHA-256 of each compressed file as read.
    """
    folder = find_dir(directory)
    if folder is None:
        raise UserError(
            f"Fashion-MNIST files not found in {directory} (nor in its {SUBDIR}/ subfolder); "
            f"expected: {', '.join(FILES)}"
        )
    checksums: dict[str, str] = {}
    train_x, train_y = _read_split(folder, TRAIN_IMAGES, TRAIN_LABELS, checksums)
    test_x, test_y = _read_split(folder, TEST_IMAGES, TEST_LABELS, checksums)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(
            f"{folder}: train images are {tuple(train_x.shape[2:])} but test images are {tuple(test_x.shape[2:])}; "
            "the files do not belong together"
        )
    return Dataset(
        name="fmnist", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        num_classes=NUM_CLASSES, source=str(folder), checksums=checksums,
    )


def decompressed_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a .gz file's decompressed content."""
    _, data = _decompress(Path(path))
    return hashlib.sha256(data).hexdigest()


def verify_file(path: str | os.PathLike, name: str | None = None) -> None:
    """Check one official file by the SHA-256 of its decompressed content; UserError on mismatch."""
    path = Path(path)
    name = name or path.name
    expected = DECOMPRESSED_SHA256[name]
    got = decompressed_sha256(path)
    if got != expected:
        raise UserError(f"{name}: decompressed SHA-256 {got} does not match the official {expected}")
