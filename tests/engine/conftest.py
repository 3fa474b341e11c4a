import pytest

from spafl.config import build_config
from spafl.data import synthetic_dataset


@pytest.fixture(scope="session")
def synthetic():
    return synthetic_dataset(num_train=400, num_test=200, seed=0)


def small_config(**overrides):
    values = {
        "dataset": "synthetic", "num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_epochs": 1,
        "batch_size": 32, "eval_every": 1, "checkpoint_every": 1, "threads": 1, "th_coeff": 0.05,
    }
    values.update(overrides)
    return build_config("fmnist-paper", overrides=values)
