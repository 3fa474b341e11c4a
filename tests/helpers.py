"""Small settings shared by tests that run the simulator."""

from spafl.config import build_config


def small_config(**overrides):
    """LeNet-5 on the synthetic dataset: 4 clients, 2 per round, 2 rounds of one epoch."""
    values = {
        "dataset": "synthetic", "num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_epochs": 1,
        "batch_size": 32, "eval_every": 1, "checkpoint_every": 1, "threads": 1, "workers": 1, "th_coeff": 0.05,
    }
    values.update(overrides)
    return build_config("fmnist-paper", overrides=values)
