import pytest

from spafl.data import synthetic_dataset


@pytest.fixture(scope="session")
def synthetic():
    """A small learnable dataset of 28x28 grey images (400 train, 200 test)."""
    return synthetic_dataset(num_train=400, num_test=200, seed=0)
