"""Generated data: a small learnable in-memory dataset (fake files in the official formats: tests/data/fakes.py)."""

from __future__ import annotations

import numpy as np
import torch

from spafl.data.datasets import Dataset
from spafl.errors import UserError

NOISE = 80  # noise half-width in pixel units: pixel = clip(prototype + U[-NOISE, NOISE])


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
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
    ytr = balanced_labels(rng, num_train, num_classes)
    xtr = _images(rng, prototypes, ytr)
    yte = balanced_labels(rng, num_test, num_classes)
    xte = _images(rng, prototypes, yte)
    return Dataset(
        name="synthetic",
        train_x=torch.from_numpy(xtr), train_y=torch.from_numpy(ytr),
        test_x=torch.from_numpy(xte), test_y=torch.from_numpy(yte),
        num_classes=num_classes, source="generated", checksums={},
    )
