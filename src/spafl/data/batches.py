"""A client's samples as model-ready minibatches, served one of two ways.

``per_sample=False`` (the fast path): index the client's contiguous uint8
tensors with a whole batch of positions and preprocess the batch at once.
``per_sample=True`` (reference-style, as the reference code and most FL
code bases do it): a map-style dataset returns one preprocessed sample per
``__getitem__`` and a ``DataLoader`` collates them. Both serve the same
samples in the same order; without augmentation the batches are identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

Batch = tuple[torch.Tensor, torch.Tensor]


class PerSampleDataset(TorchDataset):
    """One client's split, one preprocessed sample at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preprocess, train: bool, generator: torch.Generator | None) -> None:
        self.images, self.labels = images, labels
        self.preprocess, self.train, self.generator = preprocess, train, generator

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, position: int) -> Batch:
        sample = self.preprocess(self.images[position:position + 1], generator=self.generator, train=self.train)[0]
        return sample, self.labels[position]


def _index_batches(order: torch.Tensor, batch_size: int, skip_singletons: bool) -> list[torch.Tensor]:
    batches = list(order.split(batch_size))
    return [b for b in batches if not (skip_singletons and b.numel() == 1)]


def train_batches(data, order: torch.Tensor, batch_size: int, generator: torch.Generator, skip_singletons: bool) -> Iterator[Batch]:
    """Training minibatches of ``data`` in ``order``; a batch of one sample is left out when ``skip_singletons``."""
    batches = _index_batches(order, batch_size, skip_singletons)
    if not data.per_sample:
        for index in batches:
            yield data.preprocess(data.train_x[index], generator=generator, train=True), data.train_y[index]
        return
    dataset = PerSampleDataset(data.train_x, data.train_y, data.preprocess, True, generator)
    yield from DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=0)


def test_batches(data, batch_size: int) -> Iterator[Batch]:
    """The client's test split in order, in batches of ``batch_size``."""
    if not data.per_sample:
        for start in range(0, data.num_test, batch_size):
            yield data.preprocess(data.test_x[start:start + batch_size], train=False), data.test_y[start:start + batch_size]
        return
    dataset = PerSampleDataset(data.test_x, data.test_y, data.preprocess, False, None)
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
