"""The in-memory dataset record and the one entry point that loads a dataset by name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from spafl.errors import UserError

DATASETS: tuple[str, ...] = ("fmnist", "cifar10", "cifar100", "synthetic")


@dataclass
class Dataset:
    """A whole dataset held in memory as uint8 images and int64 labels.

    Images are ``[N, C, H, W]`` uint8 and contiguous; turning them into model
    input (scaling, normalization, augmentation) is the job of
    :class:`spafl.data.transforms.Preprocess`.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str
    checksums: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr, dtype, ndim in (
            ("train_x", torch.uint8, 4), ("test_x", torch.uint8, 4),
            ("train_y", torch.int64, 1), ("test_y", torch.int64, 1),
        ):
            t = getattr(self, attr)
            if t.dtype != dtype or t.dim() != ndim:
                raise ValueError(f"Dataset.{attr} must be {dtype} with {ndim} dims, got {t.dtype} {tuple(t.shape)}")
        if self.train_x.shape[0] != self.train_y.shape[0] or self.test_x.shape[0] != self.test_y.shape[0]:
            raise ValueError("Dataset: number of images and labels differ")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError("Dataset: train and test images have different shapes")
        self.train_x = self.train_x.contiguous()
        self.test_x = self.test_x.contiguous()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))


def check_name(name: str) -> str:
    """Return ``name`` if it is a known dataset, else raise a UserError listing the choices."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return name


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    Where the files come from is decided by :func:`spafl.data.locate.locate`:
    ``data_dir`` when given (authoritative), else ``$SPAFL_DATA``,
    ``~/.cache/spafl``, Debian's Fashion-MNIST package, and finally a verified
    download when ``download`` is true. ``"synthetic"`` needs no files.
    """
    check_name(name)
    if name == "synthetic":
        from spafl.data.synthetic import synthetic_dataset

        return synthetic_dataset()
    from spafl.data.locate import locate

    directory = locate(name, data_dir, download=download)
    if name == "fmnist":
        from spafl.data.fmnist import load_fmnist

        return load_fmnist(directory)
    from spafl.data.cifar import load_cifar

    return load_cifar(directory, name)
