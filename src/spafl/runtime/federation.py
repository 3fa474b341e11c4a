"""From a config to the federation: dataset, partition, per-client data, model spec; threads and device.

Shared by every engine, so an in-process run and a Flower run see the same
clients holding the same samples, and compute with the same settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from spafl.algorithms import ALGORITHMS
from spafl.algorithms.base import Algorithm, ClientData, ModelSpec
from spafl.config import Config
from spafl.data import Dataset, Partition, Preprocess, load_dataset, preprocess_for
from spafl.data.partition import make_partition
from spafl.data.registry import dataset_info
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


def configure_threads(config: Config) -> int:
    """Torch's CPU threads for this process: ``threads``, or one per core."""
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def resolve_device(config: Config) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available here; use --set device=cpu")
    return torch.device(config.device)


def make_algorithm(config: Config, spec: ModelSpec) -> Algorithm:
    """The configured algorithm; with ``execution=fast`` its models run compact (:func:`spafl.fast.enable`)."""
    algorithm = ALGORITHMS[config.method](config, spec)
    if config.execution == "fast":
        from spafl import fast

        algorithm.prepare = fast.enable
    return algorithm


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
    return make_partition(
        config.partition, dataset.train_y, dataset.test_y, config.num_clients, config.alpha, derive_seed(config.seed, "partition"),
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


def server_spec(config: Config) -> ModelSpec:
    """The model spec from the config alone, for a server that holds no data (its nodes confirm shape and classes)."""
    shape_only = SimpleNamespace(image_shape=input_shape_for(config.model), num_classes=dataset_info(config.dataset).num_classes)
    return model_spec(config, shape_only)
