"""The Python API: SpaFL on a user's own model and arrays."""

import json

import numpy as np
import pytest
from torch import nn

import spafl


def make_model():
    return spafl.sparsify(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)))


def arrays(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 20)).astype("float32") + 2.0 * np.eye(3, 20, dtype="float32")[y]
    return x, y


def test_run_on_own_model_and_float_arrays(tmp_path):
    train, test = arrays(600, 0), arrays(300, 1)
    summary = spafl.run(make_model, train=train, test=test, out=tmp_path / "mine", num_clients=4, clients_per_round=4,
                        rounds=3, local_epochs=2, lr=0.05, partition="iid", threads=1, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    # 32 + 3 thresholds per client, 4 clients up; down carries thresholds and delta
    assert rows[1]["bits_up"] == 4 * 35 * 32 and rows[1]["bits_down"] == 2 * 4 * 35 * 32
    assert summary["final"]["accuracy"] > 80  # separable classes: clearly learned
    assert json.loads((tmp_path / "mine" / "config.json").read_text())["config"]["rounds"] == 3
    # The CLI cannot rebuild a user's model and arrays: it refuses and says how to resume.
    from spafl.cli import main

    assert main(["run", "--resume", str(tmp_path / "mine")]) == 2


def test_a_model_without_masked_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sparsify"):
        spafl.run(lambda: nn.Linear(20, 3), train=arrays(50, 0), test=arrays(20, 1), out=tmp_path / "x", progress=False)
