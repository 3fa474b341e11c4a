"""Datasets (Fashion-MNIST, CIFAR-10/100, synthetic), where their files come from, client partitions, preprocessing.

:mod:`spafl.data.registry` is the one registry of dataset names
(:data:`DATASETS`, :data:`DATASET_INFO`: classes and image shape of each); it
and this package import no torch. The other names are imported on first use
(PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spafl.registry import lazy_attributes

from spafl.data.registry import DATASET_INFO, DATASETS, DatasetInfo, check_name, dataset_info

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are resolved by __getattr__
    from spafl.data.datasets import Dataset
    from spafl.data.load import load_dataset
    from spafl.data.locate import fetch
    from spafl.data.partition import Partition, dirichlet_partition, iid_partition
    from spafl.data.synthetic import synthetic_dataset
    from spafl.data.transforms import Preprocess, preprocess_for

# public name -> module that defines it
_LAZY = {
    "Dataset": "spafl.data.datasets",
    "load_dataset": "spafl.data.load",
    "fetch": "spafl.data.locate",
    "Partition": "spafl.data.partition",
    "dirichlet_partition": "spafl.data.partition",
    "iid_partition": "spafl.data.partition",
    "synthetic_dataset": "spafl.data.synthetic",
    "Preprocess": "spafl.data.transforms",
    "preprocess_for": "spafl.data.transforms",
}

__all__ = [
    "DATASETS", "DATASET_INFO", "Dataset", "DatasetInfo", "Partition", "Preprocess", "check_name", "dataset_info",
    "dirichlet_partition", "fetch", "iid_partition", "load_dataset", "preprocess_for", "synthetic_dataset",
]


__getattr__, __dir__ = lazy_attributes("spafl.data", _LAZY, globals(), __all__)
