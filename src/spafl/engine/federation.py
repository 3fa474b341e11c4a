"""From a config to the federation: dataset, partition, per-client data, model spec.

Shared by every engine, so an in-process run and a Flower run see the same
clients holding the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spafl.algorithms.base import ClientData, ModelSpec
from spafl.config import Config
from spafl.data import Dataset, Partition, Preprocess, dirichlet_partition, iid_partition, load_dataset, preprocess_for
from spafl.errors import UserError
from spafl.models import build_model, input_shape_for
from spafl.seeding import derive_seed


@dataclass
class Federation:
    config: Config
    dataset: Dataset
    partition: Partition
    clients: list[ClientData]
    spec: ModelSpec


def model_spec(config: Config, dataset: Dataset) -> ModelSpec:
    expected = input_shape_for(config.model)
    if tuple(dataset.image_shape) != tuple(expected):
        raise UserError(
            f"model {config.model} expects images of shape {expected}, dataset {config.dataset} has {tuple(dataset.image_shape)}"
        )

    def factory():
        return build_model(
            config.model, num_classes=dataset.num_classes, in_channels=dataset.image_shape[0],
            ste=config.ste, collapse_guard=config.collapse_guard,
        )

    return ModelSpec(factory=factory, input_shape=tuple(dataset.image_shape), num_classes=dataset.num_classes)


def split(config: Config, dataset: Dataset) -> Partition:
    seed = derive_seed(config.seed, "partition")
    if config.partition == "iid":
        return iid_partition(dataset.train_y, dataset.test_y, config.num_clients, seed)
    return dirichlet_partition(
        dataset.train_y, dataset.test_y, config.num_clients, config.alpha, seed,
        min_client_samples=config.min_client_samples,
    )


def client_data(config: Config, dataset: Dataset, partition: Partition, client_id: int) -> ClientData:
    """Client ``client_id``'s samples, copied into contiguous tensors."""
    if dataset.train_x.dtype == torch.uint8:
        preprocess = preprocess_for(dataset.name, config.pixels, augment=config.augment)
    else:  # a user's own float features are used as given
        preprocess = Preprocess(pixels="raw", mean=(0.0,), std=(1.0,), augment=False)
    train, test = partition.train[client_id], partition.test[client_id]
    return ClientData(
        train_x=dataset.train_x[train].contiguous(),
        train_y=dataset.train_y[train].contiguous(),
        test_x=dataset.test_x[test].contiguous(),
        test_y=dataset.test_y[test].contiguous(),
        preprocess=preprocess,
        num_classes=dataset.num_classes,
        per_sample=config.execution == "reference",
    )


def build_federation(config: Config, dataset: Dataset | None = None, spec: ModelSpec | None = None) -> Federation:
    """The federation of ``config``; ``dataset`` and ``spec`` replace the configured dataset and model."""
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir or None)
    if spec is None:
        spec = model_spec(config, dataset)
    partition = split(config, dataset)
    clients = [client_data(config, dataset, partition, k) for k in range(config.num_clients)]
    return Federation(config=config, dataset=dataset, partition=partition, clients=clients, spec=spec)
