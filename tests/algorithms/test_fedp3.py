"""FedP3: layer groups, the pruned down message, masked local training, per-layer aggregation, exact LeNet-5 bits,
resume, and the Flower strategy equal to the in-process run."""

import pytest
import torch
from torch import nn

from spafl.algorithms import ALGORITHMS, ClientTask, FedP3, ModelSpec, Reply
from spafl.engine import Simulator
from spafl.metrics import message_bits
from spafl.nn import MaskedLinear
from spafl.runtime.federation import build_federation, server_spec
from spafl.runtime.record import read_metrics
from tests.helpers import small_config

from .runs import flower_rows_equal_inprocess, needs_flower, resumed_run_equals_uninterrupted
from .tiny import tiny_data

LENET = {"conv1.weight": 500, "conv2.weight": 25_000, "fc1.weight": 400_000, "fc2.weight": 5_000}
#: per OPU2 group (LeNet-5): bits up, bits down with a personal final layer, with a global one (module docstring)
OPU2_BITS = {0: (976_000, 12_736_000, 12_896_000), 1: (13_760_000, 13_614_900, 13_774_900), 2: (12_976_000, 13_561_000, 13_721_000)}


class Deep(nn.Module):
    """Four masked layers like LeNet-5's (three body layers and a final one), on 2x2 inputs."""

    def __init__(self):
        super().__init__()
        self.fc1 = MaskedLinear(4, 6, bias=False)
        self.fc2 = MaskedLinear(6, 6, bias=True)
        self.fc3 = MaskedLinear(6, 6, bias=False)
        self.fc4 = MaskedLinear(6, 2, bias=False)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(x)))))


def fedp3(spec=None, **overrides):
    values = {"method": "fedp3", "num_clients": 3, "local_epochs": 2, "batch_size": 4, "lr": 0.05, "fedp3_final_layer": "personal", **overrides}
    return FedP3(small_config(**values), spec or ModelSpec(factory=Deep, input_shape=(1, 2, 2), num_classes=2))


def test_registered_and_the_groups_of_lenet5():
    assert ALGORITHMS["fedp3"] is FedP3
    config = small_config(method="fedp3", num_clients=4)
    algo = FedP3(config, server_spec(config))
    assert algo.body == ["conv1", "conv2", "fc1"] and algo.final == "fc2"
    # group floor(3k / 4): 0, 0, 1, 2; consecutive pairs wrap around
    assert [algo.upload_layers(k) for k in range(4)] == [
        ["conv1", "conv2", "fc2"], ["conv1", "conv2", "fc2"], ["conv2", "fc1", "fc2"], ["conv1", "fc1", "fc2"],
    ]
    opu3 = FedP3(config.replace(fedp3_upload="opu3"), server_spec(config))
    assert all(opu3.upload_layers(k) == ["conv1", "conv2", "fc1", "fc2"] for k in range(4))


@pytest.mark.parametrize("final_layer", ["personal", "global"])
def test_the_down_message_prunes_what_the_client_does_not_upload(final_layer):
    config = small_config(method="fedp3", num_clients=3, fedp3_final_layer=final_layer)
    algo = FedP3(config, server_spec(config))
    server = algo.init_server(algo.spec.initial_state(0))
    model = server["model"]
    for client, group in ((0, 0), (1, 1), (2, 2)):
        down = algo.server_message(server, client, 0)
        uploads = algo.upload_layers(client)
        pruned = [layer for layer in algo.body if layer not in uploads]
        assert len(pruned) == 1
        key = f"{pruned[0]}.weight"
        mask, kept = down[f"mask/{key}"], down[f"kept/{key}"]
        assert mask.dtype == torch.bool and int(mask.sum()) == kept.numel() == round(0.9 * LENET[key])
        # the kept weights are the largest in magnitude, in row-major order
        magnitude = model[key].abs()
        assert float(magnitude[mask].min()) >= float(magnitude[~mask].max())
        assert torch.equal(kept, model[key][mask])
        dense = {f"weights/{layer}.weight" for layer in uploads if layer != "fc2" or final_layer == "global"}
        assert set(down) == dense | {f"mask/{key}", f"kept/{key}"}
        assert all(torch.equal(down[name], model[name.removeprefix("weights/")]) for name in dense)
        _, personal, global_ = OPU2_BITS[group]
        assert message_bits(down) == (personal if final_layer == "personal" else global_)


def test_client_trains_the_pruned_subnetwork_and_uploads_its_layers():
    # momentum, weight decay and clipping must not revive a pruned weight
    algo = fedp3(fedp3_global_keep=0.5, momentum=0.9, weight_decay=0.01, grad_clip=1.0)
    server = algo.init_server(algo.spec.initial_state(0))
    client = algo.init_client(1, algo.spec.initial_state(0))
    assert algo.upload_layers(1) == ["fc2", "fc3", "fc4"]  # group 1 of 3: fc1 is pruned
    down = algo.server_message(server, 1, 0)
    assert set(down) == {"mask/fc1.weight", "kept/fc1.weight", "weights/fc2.weight", "weights/fc2.bias", "weights/fc3.weight"}
    result = algo.client_update(client, down, tiny_data(), ClientTask(1, 0, 0))
    trained, masks = result.state["model"], result.state["masks"]
    mask = down["mask/fc1.weight"]
    assert torch.equal(masks["fc1.weight"], mask) and int(mask.sum()) == 12
    assert torch.all(trained["fc1.weight"][~mask] == 0)
    assert not torch.equal(trained["fc1.weight"][mask], down["kept/fc1.weight"])  # the kept weights trained
    assert all(bool(masks[key].all()) for key in ("fc2.weight", "fc3.weight", "fc4.weight"))
    assert set(result.message) == {"weights/fc2.weight", "weights/fc2.bias", "weights/fc3.weight", "weights/fc4.weight"}
    assert all(torch.equal(result.message[name], trained[name.removeprefix("weights/")]) for name in result.message)
    # the personal final layer is the client's own, trained from where it was
    assert not torch.equal(trained["fc4.weight"], client["model"]["fc4.weight"])
    assert result.stats["steps"] == 4 and result.stats["flops"] == 3 * 2 * 8 * (4 * 6 + 6 * 6 + 6 * 6 + 6 * 2)
    evaluation = algo.evaluate(algo.evaluation_state(result.state, server), tiny_data(), 100)
    assert evaluation.density == pytest.approx((0.5 + 3) / 4)
    assert evaluation.density_weighted == pytest.approx((12 + 36 + 36 + 12) / (24 + 36 + 36 + 12))
    assert algo.validate_reply(server, Reply(1, result.message, 8)) is None
    assert "missing" in algo.validate_reply(server, Reply(0, result.message, 8))  # client 0 uploads fc1, not fc3
    # a client without training data takes no step and sends the layers it received
    empty = tiny_data()
    empty.train_x, empty.train_y = empty.train_x[:0], empty.train_y[:0]
    idle = algo.client_update(client, down, empty, ClientTask(1, 0, 0))
    assert idle.stats["steps"] == 0 and torch.equal(idle.message["weights/fc3.weight"], down["weights/fc3.weight"])


def test_local_pruning_prunes_a_fraction_of_every_layer_by_magnitude():
    algo = fedp3(fedp3_global_keep=0.5, fedp3_local_prune=0.5, fedp3_final_layer="global")
    server = algo.init_server(algo.spec.initial_state(0))
    down = algo.server_message(server, 1, 0)
    result = algo.client_update(algo.init_client(1, algo.spec.initial_state(0)), down, tiny_data(), ClientTask(1, 0, 0))
    masks, trained = result.state["masks"], result.state["model"]
    assert {key: int(mask.sum()) for key, mask in masks.items()} == {"fc1.weight": 6, "fc2.weight": 18, "fc3.weight": 18, "fc4.weight": 6}
    assert masks["fc1.weight"].logical_and(~down["mask/fc1.weight"]).sum() == 0  # within the server's mask
    received = server["model"]["fc3.weight"].abs()
    assert float(received[masks["fc3.weight"]].min()) >= float(received[~masks["fc3.weight"]].max())
    assert all(torch.all(trained[key][~mask] == 0) for key, mask in masks.items())


def upload(**tensors):
    return {f"weights/{name}": torch.tensor(value) for name, value in tensors.items()}


def test_aggregation_averages_each_layer_over_the_clients_that_uploaded_it():
    for weighting, expected in (("uniform", [[3.0] * 6] * 2), ("samples", [[4.0] * 6] * 2)):
        algo = fedp3(fedp3_weighting=weighting)
        server = algo.init_server(algo.spec.initial_state(0))
        old = server["model"]
        replies = [  # fc2 from clients 0 and 1 (samples 1 and 3), fc4 from all three, fc1 and fc3 from nobody
            Reply(0, upload(**{"fc2.weight": [[0.0] * 6] * 6, "fc2.bias": [0.0] * 6, "fc4.weight": [[1.0] * 6] * 2}), 1),
            Reply(1, upload(**{"fc2.weight": [[4.0] * 6] * 6, "fc2.bias": [8.0] * 6, "fc4.weight": [[5.0] * 6] * 2}), 3),
            Reply(2, upload(**{"fc4.weight": [[3.0] * 6] * 2}), 0),
        ]
        new = algo.aggregate(server, replies, 0)["model"]
        assert new["fc4.weight"].tolist() == expected
        fc2 = 2.0 if weighting == "uniform" else 3.0
        assert new["fc2.weight"].eq(fc2).all() and new["fc2.bias"].eq(2 * fc2).all()
        assert new["fc4.weight"].dtype == torch.float32
        assert torch.equal(new["fc1.weight"], old["fc1.weight"]) and torch.equal(new["fc3.weight"], old["fc3.weight"])
        assert torch.equal(server["model"]["fc2.weight"], algo.spec.initial_state(0)["fc2.weight"])  # not changed in place
    # samples weighting with no samples at all: a plain mean
    zero = [Reply(r.client_id, r.message, 0) for r in replies]
    assert algo.aggregate(server, zero, 0)["model"]["fc4.weight"].eq(3.0).all()


# -- LeNet-5 on synthetic data ------------------------------------------------------------------
def simulate(tmp_path, synthetic, name="run", **overrides):
    config = small_config(method="fedp3", pixels="normalized", lr=0.01, **overrides)
    return Simulator(config, tmp_path / name, federation=build_federation(config, synthetic), progress=False)


@pytest.mark.parametrize("final_layer", ["personal", "global"])
def test_two_rounds_count_the_bits_of_the_formula(tmp_path, synthetic, final_layer):
    simulator = simulate(tmp_path, synthetic, fedp3_final_layer=final_layer)
    simulator.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for row in rows[1:]:
        groups = [3 * k // 4 for k in row["sampled"]]  # N = 4
        assert row["bits_up"] == sum(OPU2_BITS[g][0] for g in groups)
        assert row["bits_down"] == sum(OPU2_BITS[g][1 if final_layer == "personal" else 2] for g in groups)
        assert row["density_weighted"] < 1.0 and row["accuracy"] > 0
    assert rows[-1]["bits_cum"] == sum(r["bits_up"] + r["bits_down"] for r in rows[1:])


def test_resume_gives_identical_metrics(tmp_path, synthetic, monkeypatch):
    resumed_run_equals_uninterrupted(tmp_path, monkeypatch, lambda name: simulate(tmp_path, synthetic, name))


@needs_flower
def test_flower_strategy_equals_the_inprocess_run(tmp_path):
    rows = flower_rows_equal_inprocess(tmp_path, "method=fedp3; rounds=2; eval_every=1")
    assert rows[1]["bits_up"] > 0 and rows[2]["evaluated"]
