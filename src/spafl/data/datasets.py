"""The in-memory dataset record and the one entry point that loads a dataset by name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from spafl.data.registry import DATASETS, check_name

__all__ = ["DATASETS", "Dataset", "check_name", "load_dataset"]  # DATASETS, check_name: see spafl.data.registry


@dataclass
class Dataset:
    """A whole dataset held in memory: inputs and int64 labels.

    The built-in datasets hold ``[N, C, H, W]`` uint8 images; turning them into
    model input (scaling, normalization, augmentation) is the job of
    :class:`spafl.data.transforms.Preprocess`. A user's own data
    (:func:`spafl.api.run`) may instead be float32 features of any shape
    ``[N, ...]``, which are used as given.
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
        for attr in ("train_x", "test_x"):
            t = getattr(self, attr)
            if not ((t.dtype == torch.uint8 and t.dim() == 4) or (t.dtype == torch.float32 and t.dim() >= 2)):
                raise ValueError(f"Dataset.{attr} must be uint8 [N, C, H, W] images or float32 [N, ...] features, got {t.dtype} {tuple(t.shape)}")
        for attr in ("train_y", "test_y"):
            t = getattr(self, attr)
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"Dataset.{attr} must be int64 with 1 dim, got {t.dtype} {tuple(t.shape)}")
        if self.train_x.shape[0] != self.train_y.shape[0] or self.test_x.shape[0] != self.test_y.shape[0]:
            raise ValueError("Dataset: number of images and labels differ")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError("Dataset: train and test images have different shapes")
        self.train_x = self.train_x.contiguous()
        self.test_x = self.test_x.contiguous()

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one input: (C, H, W) for images."""
        return tuple(int(size) for size in self.train_x.shape[1:])


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
