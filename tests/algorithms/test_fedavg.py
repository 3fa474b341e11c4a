"""FedAvg: exact sample-weighted aggregation, what travels, dense training, and a short simulated run."""

import json

import pytest
import torch
from torch import nn

from spafl.algorithms import ALGORITHMS, ClientTask, FedAvg, ModelSpec, Reply
from spafl.config import build_config
from spafl.engine import Simulator
from spafl.runtime.federation import build_federation
from spafl.metrics import message_bits
from spafl.nn import MaskedLinear, masked_layers
from tests.helpers import small_config

from .tiny import TinyWithBias as TinyClassifier
from .tiny import tiny_data

LENET_WEIGHTS = 430_500
LENET_MACS = 20 * 25 * 24 * 24 + 50 * 500 * 8 * 8 + 800 * 500 + 500 * 10  # conv1, conv2, fc1, fc2 per sample


class Tiny(nn.Module):
    def __init__(self, batchnorm=False):
        super().__init__()
        self.fc1 = MaskedLinear(2, 2, bias=True)
        self.norm = nn.BatchNorm1d(2) if batchnorm else nn.Identity()
        self.fc2 = MaskedLinear(2, 1, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x.flatten(1)))))


def fedavg(factory=Tiny, input_shape=(1, 1, 2), **overrides):
    config = build_config("fmnist-paper", overrides={"local_epochs": 1, "batch_size": 4, "lr": 0.1, **overrides})
    return FedAvg(config, ModelSpec(factory=factory, input_shape=input_shape, num_classes=2))


def weights_message(fc1_weight, fc1_bias, fc2_weight):
    return {
        "weights/fc1.weight": torch.tensor(fc1_weight),
        "weights/fc1.bias": torch.tensor(fc1_bias),
        "weights/fc2.weight": torch.tensor(fc2_weight),
    }


def test_registered_and_messages_carry_every_weight_but_no_threshold():
    assert ALGORITHMS["fedavg"] is FedAvg
    algo = fedavg()
    server = algo.init_server(algo.spec.initial_state(0))
    down = algo.server_message(server, 0, 0)
    assert set(down) == {"weights/fc1.weight", "weights/fc1.bias", "weights/fc2.weight"}
    assert message_bits(down) == (4 + 2 + 2) * 32


def test_batchnorm_statistics_travel_but_not_the_batch_counter():
    algo = fedavg(factory=lambda: Tiny(batchnorm=True))
    down = algo.server_message(algo.init_server(algo.spec.initial_state(0)), 0, 0)
    assert set(down) == {
        "weights/fc1.weight", "weights/fc1.bias", "weights/fc2.weight",
        "weights/norm.weight", "weights/norm.bias", "weights/norm.running_mean", "weights/norm.running_var",
    }
    assert message_bits(down) == (4 + 2 + 2 + 4 * 2) * 32


def test_aggregation_is_the_exact_sample_weighted_mean():
    algo = fedavg()
    initial = algo.spec.initial_state(0)
    server = algo.init_server(initial)
    replies = [  # weights 1/8, 3/8, 4/8
        Reply(0, weights_message([[8.0, 0.0], [0.0, 0.0]], [1.0, 0.0], [[0.0, 8.0]]), num_samples=1),
        Reply(1, weights_message([[0.0, 8.0], [0.0, 0.0]], [1.0, 0.0], [[0.0, 0.0]]), num_samples=3),
        Reply(2, weights_message([[0.0, 0.0], [2.0, 0.0]], [1.0, -2.0], [[4.0, 0.0]]), num_samples=4),
    ]
    new = algo.aggregate(server, replies, 0)["model"]
    assert new["fc1.weight"].tolist() == [[1.0, 3.0], [1.0, 0.0]]
    assert new["fc1.bias"].tolist() == [1.0, -1.0]
    assert new["fc2.weight"].tolist() == [[2.0, 1.0]]
    assert new["fc1.weight"].dtype == torch.float32
    # what does not travel keeps its value
    assert torch.equal(new["fc1.threshold"], initial["fc1.threshold"])
    assert torch.equal(new["fc2.kept_fraction"], initial["fc2.kept_fraction"])
    # no sample counts at all: uniform mean
    zero = [Reply(r.client_id, r.message, 0) for r in replies]
    assert algo.aggregate(server, zero, 0)["model"]["fc1.bias"].tolist() == pytest.approx([1.0, -2 / 3])
    # no replies: the global model is unchanged; the old server state is never modified
    assert algo.aggregate(server, [], 0) is server
    assert all(torch.equal(server["model"][k], initial[k]) for k in initial)


def test_validate_reply_rejects_wrong_names_shapes_dtypes_and_non_finite_values():
    algo = fedavg()
    server = algo.init_server(algo.spec.initial_state(0))
    good = weights_message([[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0], [[1.0, 1.0]])
    assert algo.validate_reply(server, Reply(0, good, 5)) is None
    assert "missing" in algo.validate_reply(server, Reply(0, {k: v for k, v in good.items() if k != "weights/fc1.bias"}, 5))
    assert "unexpected" in algo.validate_reply(server, Reply(0, {**good, "weights/fc1.threshold": torch.zeros(2)}, 5))
    assert "shape" in algo.validate_reply(server, Reply(0, {**good, "weights/fc1.bias": torch.zeros(3)}, 5))
    assert "dtype" in algo.validate_reply(server, Reply(0, {**good, "weights/fc1.bias": torch.zeros(2, dtype=torch.float64)}, 5))
    assert "non-finite" in algo.validate_reply(server, Reply(0, {**good, "weights/fc1.bias": torch.tensor([0.0, float("nan")])}, 5))


def test_client_update_trains_every_weight_densely_and_keeps_thresholds():
    algo = fedavg(factory=TinyClassifier, input_shape=(1, 2, 2))
    server = algo.init_server(algo.spec.initial_state(0))
    down = algo.server_message(server, 0, 0)
    result = algo.client_update({}, down, tiny_data(), ClientTask(0, 0, 0))
    assert result.state == {}  # clients keep nothing
    assert set(result.message) == set(down) and message_bits(result.message) == message_bits(down) == (12 + 3 + 6 + 2) * 32
    for name, tensor in result.message.items():
        assert not torch.equal(tensor, down[name]), name  # every weight and bias was trained
    model = algo.workspace()
    assert all(not layer.masking and layer.density() == 1.0 for _, layer in masked_layers(model))
    assert all(float(layer.threshold.abs().max()) == 0.0 for _, layer in masked_layers(model))
    assert not any(layer.threshold.requires_grad for _, layer in masked_layers(model))
    # 8 samples, E = 1, batch 4; reference FLOPs at density 1, no threshold work: 3 * E * n * (4*3 + 3*2)
    assert result.stats["steps"] == 2 and result.stats["num_samples"] == 8 and result.stats["train_loss"] > 0
    assert result.stats["flops"] == 3 * 8 * 18
    # same task, same upload: all randomness derives from (seed, client, round)
    again = algo.client_update({}, down, tiny_data(), ClientTask(0, 0, 0))
    assert all(torch.equal(again.message[k], result.message[k]) for k in result.message)
    # a threshold that would prune every unit with masking on takes no part: evaluation is dense
    evaluated = algo.workspace({**algo.evaluation_state({}, server), "fc1.threshold": torch.full((3,), 100.0)})
    assert evaluated(torch.ones(1, 4)).abs().sum() > 0
    assert all(layer.density() == 1.0 for _, layer in masked_layers(evaluated))


# -- the simulator on synthetic data --------------------------------------------------

def simulate(tmp_path, synthetic, **overrides):
    values = {"method": "fedavg", "pixels": "normalized", "lr": 0.01, "partition": "iid", **overrides}
    config = small_config(**values)
    simulator = Simulator(config, tmp_path / "run", federation=build_federation(config, synthetic), progress=False)
    return simulator


def test_three_rounds_exact_bits_dense_and_accuracy_improves(tmp_path, synthetic):
    simulator = simulate(tmp_path, synthetic, rounds=3)
    summary = simulator.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    per_round = 2 * LENET_WEIGHTS * 32  # K = 2 sampled clients, 430,500 float32 weights each way
    for row in rows[1:]:
        assert row["bits_up"] == row["bits_down"] == per_round == 27_552_000
    assert summary["bits_total"] == 3 * 2 * per_round
    assert all(r["density"] == 1.0 and r["density_weighted"] == 1.0 for r in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 15
    # FLOPs: 3 * E * n_k * dense MACs per sampled client, summed and divided by N = 4
    sizes = [c.num_train for c in simulator.federation.clients]
    expected = sum(3 * 1 * sizes[k] * LENET_MACS for r in rows[1:] for k in r["sampled"]) / 4
    assert rows[-1]["flops_cum"] == pytest.approx(expected)


def test_server_weights_are_the_sample_weighted_mean_of_the_uploads(tmp_path, synthetic):
    simulator = simulate(tmp_path, synthetic, partition="dirichlet", alpha=0.5)
    algorithm = simulator.algorithm
    uploads = {}
    original = algorithm.client_update

    def recording(client, message, data, task):
        result = original(client, message, data, task)
        uploads[task.client_id] = (result.message, data.num_train)
        return result

    algorithm.client_update = recording
    state = simulator.fresh_state()
    initial = {k: v.clone() for k, v in state["server"]["model"].items()}
    simulator.run_round(state, 0)
    assert len(uploads) == 2 and len({n for _, n in uploads.values()}) == 2  # two clients of different sizes
    total = sum(n for _, n in uploads.values())
    for name in algorithm.weight_names:
        expected = sum(message["weights/" + name].double() * n / total for message, n in uploads.values())
        assert torch.allclose(state["server"]["model"][name].double(), expected, atol=1e-7)
        assert not torch.equal(state["server"]["model"][name], initial[name])
    assert list(state["clients"]) == [{}, {}, {}, {}]
    # every client is evaluated with the global model
    assert all(algorithm.evaluation_state(c, state["server"]) is state["server"]["model"] for c in state["clients"])
