"""The in-memory dataset record (:func:`spafl.data.load.load_dataset` loads one by name)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spafl.data.registry import DATASETS, check_name

__all__ = ["DATASETS", "Dataset", "check_name"]  # DATASETS, check_name: see spafl.data.registry


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
