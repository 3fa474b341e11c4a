"""Datasets (Fashion-MNIST, CIFAR-10/100, synthetic), where their files come from, client partitions, preprocessing."""

from spafl.data.datasets import DATASETS, Dataset, load_dataset
from spafl.data.locate import fetch
from spafl.data.partition import Partition, dirichlet_partition, iid_partition
from spafl.data.synthetic import synthetic_dataset
from spafl.data.transforms import Preprocess, preprocess_for

__all__ = [
    "DATASETS", "Dataset", "Partition", "Preprocess", "dirichlet_partition", "fetch", "iid_partition",
    "load_dataset", "preprocess_for", "synthetic_dataset",
]
