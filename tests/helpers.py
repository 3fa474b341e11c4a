"""Small settings shared by tests that run the simulator, and the check of a CLI error."""

from spafl.cli import main
from spafl.config import build_config


def fails(capsys, argv, *fragments, code=2):
    """Run the CLI on ``argv``: it must exit with ``code`` and say every fragment in one line on stderr, no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def small_config(**overrides):
    """LeNet-5 on the synthetic dataset: 4 clients, 2 per round, 2 rounds of one epoch."""
    values = {
        "dataset": "synthetic", "num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_epochs": 1,
        "batch_size": 32, "eval_every": 1, "checkpoint_every": 1, "threads": 1, "workers": 1, "th_coeff": 0.05,
    }
    values.update(overrides)
    return build_config("fmnist-paper", overrides=values)
