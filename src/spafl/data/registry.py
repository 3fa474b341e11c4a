"""The one registry of dataset names, with what a server needs to know about each without loading it.

``Config.dataset`` takes its choices from :data:`DATASETS`; a Flower server
builds the model from :data:`DATASET_INFO` (number of classes, image shape)
without holding any data. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from spafl.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in dataset as known before loading it."""

    name: str
    num_classes: int
    #: ``(channels, height, width)`` of one image
    image_shape: tuple[int, int, int]


#: Dataset name -> its number of classes and image shape.
DATASET_INFO: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("fmnist", 10, (1, 28, 28)),
        DatasetInfo("cifar10", 10, (3, 32, 32)),
        DatasetInfo("cifar100", 100, (3, 32, 32)),
        DatasetInfo("synthetic", 10, (1, 28, 28)),  # synthetic_dataset()'s defaults
    )
}

#: The dataset names, in registry order.
DATASETS: tuple[str, ...] = tuple(DATASET_INFO)


def check_name(name: str) -> str:
    """Return ``name`` if it is a known dataset, else raise a UserError listing the choices."""
    if name not in DATASET_INFO:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return name


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of dataset ``name`` (a UserError listing the choices for an unknown one)."""
    return DATASET_INFO[check_name(name)]
