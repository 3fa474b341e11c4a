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


#: The largest shape each file's IDX header may announce (the official files' shapes): a header promising more is
#: refused before anything is inflated, and no file is inflated past what its header announces (a gzip bomb stops there).
MAX_SHAPES: dict[str, tuple[int, ...]] = {
    TRAIN_IMAGES: (60000, 28, 28), TRAIN_LABELS: (60000,), TEST_IMAGES: (10000, 28, 28), TEST_LABELS: (10000,),
}


def _idx_bytes(shape: tuple[int, ...]) -> int:
    return 4 + 4 * len(shape) + int(np.prod(shape, dtype=np.int64))


class Gunzip:
    """The decompressed bytes of gzip data (all members; CRC checked), inflated only as far as :meth:`read` asks.

    Raises EOFError on truncated input and zlib.error on corrupt input.
    """

    def __init__(self, raw: bytes, chunk: int = 1 << 20) -> None:
        self.view, self.pos, self.chunk = memoryview(raw), 0, chunk
        self.inflate = zlib.decompressobj(wbits=31)
        self.tail = b""  # input the decompressor has not consumed yet

    def read(self, size: int) -> bytes:
        """Up to ``size`` more bytes (fewer only at the end of the data)."""
        parts = []
        while size > 0:
            if self.inflate.eof:  # the end of a member: another one may follow, after optional zero padding
                rest = (bytes(self.inflate.unused_data) + bytes(self.view[self.pos:])).lstrip(b"\x00")
                if not rest:
                    break
                self.view, self.pos, self.tail = memoryview(rest), 0, b""
                self.inflate = zlib.decompressobj(wbits=31)
                continue
            data = self.tail
            if not data:
                if self.pos >= len(self.view):
                    raise EOFError("compressed data ended before the end-of-stream marker")
                data = bytes(self.view[self.pos:self.pos + self.chunk])
                self.pos += len(data)
            out = self.inflate.decompress(data, size)
            self.tail = self.inflate.unconsumed_tail
            parts.append(out)
            size -= len(out)
        return b"".join(parts)


def _read_idx_gz(path: Path, name: str, magic: int) -> tuple[bytes, bytes]:
    """(compressed bytes, decompressed IDX bytes) of the file ``name`` at ``path``; UserError on a broken or oversized file.

    Inflates the header, checks it against :data:`MAX_SHAPES`, then exactly
    the data it announces, and refuses a file that decompresses to more.
    """
    largest = MAX_SHAPES[name]
    room = _idx_bytes(largest)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(room + room // 100 + (1 << 20))  # gzip adds < 1% to incompressible data
            oversized = bool(handle.read(1))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if oversized:
        raise UserError(f"{path} is larger than any Fashion-MNIST {name} could be; it is not that file")
    stream = Gunzip(raw)
    ndim = magic & 0xFF
    try:
        data = stream.read(4)
        if len(data) == 4 and struct.unpack(">I", data)[0] == magic:
            data += stream.read(4 * ndim)
        if len(data) == 4 + 4 * ndim:  # else parse_idx says what is wrong
            dims = struct.unpack(">" + "I" * ndim, data[4:])
            if any(size > limit for size, limit in zip(dims, largest)):
                raise UserError(
                    f"{path}: IDX header announces shape {dims}, more than Fashion-MNIST's {name} holds "
                    f"(at most {largest}); the file is corrupt or not the right file"
                )
            data += stream.read(_idx_bytes(dims) - len(data))
            if len(data) == _idx_bytes(dims) and stream.read(1):
                raise UserError(
                    f"{path} decompresses to more than the {len(data)} bytes its IDX header announces; "
                    "the file is corrupt or not the right file"
                )
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
        raw, data = _read_idx_gz(path, name, magic)
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


def decompressed_sha256(path: str | os.PathLike, name: str | None = None) -> str:
    """SHA-256 of the decompressed content of the official file ``name`` (default: the file's own name) at ``path``."""
    name = name or Path(path).name
    magic = IDX_MAGIC_IMAGES if name in (TRAIN_IMAGES, TEST_IMAGES) else IDX_MAGIC_LABELS
    _, data = _read_idx_gz(Path(path), name, magic)
    return hashlib.sha256(data).hexdigest()


def verify_file(path: str | os.PathLike, name: str | None = None) -> None:
    """Check one official file by the SHA-256 of its decompressed content; UserError on mismatch."""
    path = Path(path)
    name = name or path.name
    expected = DECOMPRESSED_SHA256[name]
    got = decompressed_sha256(path, name)
    if got != expected:
        raise UserError(f"{name}: decompressed SHA-256 {got} does not match the official {expected}")
