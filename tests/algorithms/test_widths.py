"""Width slicing (HeteroFL, FjORD): sub-model shapes, slices as leading blocks, the covered mean, static BatchNorm."""

import pytest
import torch

from spafl.algorithms import ModelSpec
from spafl.algorithms.widths import (
    WIDTH_TABLES, WidthLayer, build_sliced, covered_mean, prefix, slice_state, static_norm_statistics, width_units,
)
from spafl.models import Conv4, LeNet5
from spafl.nn import masked_layers

from .tiny import Tiny, tiny_data

TINY_TABLE = (WidthLayer("fc1", None), WidthLayer("fc2", "fc1", hidden=False))


def lenet_weights(r: float) -> int:
    """LeNet-5's weights at width r (no biases): the formula of the modules' docstrings."""
    c1, c2, f1 = width_units(r, 20), width_units(r, 50), width_units(r, 500)
    return c1 * 1 * 25 + c2 * c1 * 25 + f1 * c2 * 16 + 10 * f1


def test_width_units_round_up_without_float_noise():
    assert [width_units(r, 20) for r in (1, 0.5, 0.25, 0.125, 0.0625)] == [20, 10, 5, 3, 2]
    assert [width_units(p, 500) for p in (0.2, 0.4, 0.6, 0.8, 1.0)] == [100, 200, 300, 400, 500]
    assert width_units(0.6, 50) == 30 and width_units(0.001, 20) == 1
    assert [lenet_weights(r) for r in (1, 0.5, 0.25, 0.125, 0.0625)] == [430_500, 109_000, 29_000, 8_286, 2_618]
    assert [lenet_weights(p) for p in (0.2, 0.4, 0.6, 0.8)] == [18_100, 70_200, 156_300, 276_400]


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25, 0.125, 0.0625, 0.6])
def test_lenet_sub_model_shapes(width):
    model = build_sliced(LeNet5, WIDTH_TABLES[LeNet5], width, track_statistics=False)
    c1, c2, f1 = width_units(width, 20), width_units(width, 50), width_units(width, 500)
    shapes = {name: tuple(layer.weight.shape) for name, layer in masked_layers(model)}
    assert shapes == {"conv1": (c1, 1, 5, 5), "conv2": (c2, c1, 5, 5), "fc1": (f1, c2 * 16), "fc2": (10, f1)}
    assert sum(layer.weight.numel() for _, layer in masked_layers(model)) == lenet_weights(width)
    assert all(not layer.masking for _, layer in masked_layers(model))
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_conv4_sub_model_slices_its_batchnorm_with_its_layers():
    model = build_sliced(Conv4, WIDTH_TABLES[Conv4], 0.25, track_statistics=False)
    shapes = {name: tuple(layer.weight.shape) for name, layer in masked_layers(model)}
    assert shapes == {
        "conv1": (16, 3, 5, 5), "conv2": (16, 16, 5, 5), "conv3": (32, 16, 5, 5), "conv4": (32, 32, 5, 5),
        "fc1": (32, 32 * 4), "fc2": (32, 32), "fc3": (10, 32),
    }
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert {name: m.num_features for name, m in norms.items()} == {"bn1": 16, "bn2": 16, "bn3": 32, "bn4": 32, "bn5": 32, "bn6": 32}
    assert all(not m.track_running_stats and m.running_mean is None for m in norms.values())  # static BN in training
    assert not any(k.endswith("running_mean") for k in model.state_dict())
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    tracking = build_sliced(Conv4, WIDTH_TABLES[Conv4], 0.25, track_statistics=True)
    assert all(m.track_running_stats and m.momentum is None for m in tracking.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_sliced_lenet_computes_the_full_model_with_the_other_units_cut_off():
    """The sub-model on the leading blocks = the full model whose dropped units feed nothing (fc1 columns channel-major)."""
    torch.manual_seed(0)
    full = build_sliced(LeNet5, WIDTH_TABLES[LeNet5], 1.0, track_statistics=False)
    sub = build_sliced(LeNet5, WIDTH_TABLES[LeNet5], 0.5, track_statistics=False)
    shapes = {name: tuple(t.shape) for name, t in sub.state_dict().items() if name.endswith("weight")}
    sub.load_state_dict(slice_state(full.state_dict(), shapes), strict=False)
    cut = full.state_dict()
    with torch.no_grad():
        cut["conv2.weight"][:, 10:] = 0  # conv1's units 10..19
        cut["fc1.weight"][:, 25 * 16:] = 0  # conv2's channels 25..49, 16 columns each
        cut["fc2.weight"][:, 250:] = 0  # fc1's units 250..499
    full.load_state_dict(cut)
    x = torch.rand(5, 1, 28, 28) * 255
    torch.testing.assert_close(sub(x), full(x), rtol=1e-4, atol=1e-3)


def test_slice_state_takes_leading_blocks_as_compact_copies():
    state = {"w": torch.arange(12.0).view(3, 4), "b": torch.arange(3.0)}
    sliced = slice_state(state, {"w": (2, 3)})
    assert sliced["w"].tolist() == [[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]] and set(sliced) == {"w"}
    assert sliced["w"].is_contiguous() and sliced["w"].untyped_storage().nbytes() == 6 * 4
    assert prefix((2, 3)) == (slice(0, 2), slice(0, 3))


def test_covered_mean_by_hand():
    old = {"w": torch.tensor([[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]), "other": torch.tensor([7.0])}
    a = ({"w": torch.tensor([[1.0, 2.0]])}, 1.0, {})  # holds w[0, :2]
    b = ({"w": torch.tensor([[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])}, 3.0, {"w": torch.tensor([False, True])})  # row 1 only
    c = ({"w": torch.tensor([[100.0]])}, 0.0, {})  # weight 0: holds nothing
    new = covered_mean(old, [a, b, c])
    # w[0,0] only a: 1; w[0,1] only a (b's row 0 is not taken): 2; w[0,2] nobody: 9; row 1 only b
    assert new["w"].tolist() == [[1.0, 2.0, 9.0], [6.0, 7.0, 8.0]]
    assert new["other"] is old["other"] and old["w"][0, 0] == 9.0
    d = ({"w": torch.tensor([[5.0]])}, 3.0, {})
    assert covered_mean(old, [a, d])["w"][0, 0] == (1.0 * 1 + 5.0 * 3) / 4
    assert covered_mean(old, [])["w"] is old["w"]


def test_static_batchnorm_statistics_come_from_the_clients_training_split(monkeypatch):
    class Normed(Tiny):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3)

        def forward(self, x):
            return self.fc2(torch.relu(self.norm(self.fc1(x.flatten(1)))))

    monkeypatch.setitem(WIDTH_TABLES, Normed, (WidthLayer("fc1", None, norm="norm"), WidthLayer("fc2", "fc1", hidden=False)))
    model = build_sliced(Normed, WIDTH_TABLES[Normed], 0.5, track_statistics=True)
    data = tiny_data(n=8)
    static_norm_statistics(model, data, batch_size=8, device=torch.device("cpu"))
    with torch.no_grad():
        features = model.fc1(data.preprocess(data.train_x, train=False).flatten(1))
    torch.testing.assert_close(model.norm.running_mean, features.mean(0))
    torch.testing.assert_close(model.norm.running_var, features.var(0))  # one batch: its (unbiased) variance
    assert not model.training


def test_a_model_without_a_width_table_is_refused_in_init():
    from spafl.algorithms import ALGORITHMS
    from spafl.config import build_config
    from spafl.errors import UserError
    from spafl.models import build_model

    spec = ModelSpec(factory=lambda: build_model("resnet18", 100, 3), input_shape=(3, 32, 32), num_classes=100)
    for method in ("heterofl", "fjord"):
        config = build_config("fmnist-quick", overrides={"method": method, "model": "resnet18"})
        with pytest.raises(UserError, match=f"^{method} slices model widths and supports the models lenet5, conv4; got resnet18"):
            ALGORITHMS[method](config, spec)
    assert TINY_TABLE[0].fed_by is None  # the tiny table the method tests register


@pytest.mark.parametrize("method", ["heterofl", "fjord"])
def test_conv4_slices_train_and_evaluate_with_static_batchnorm(method):
    from spafl.algorithms import ALGORITHMS, ClientData, ClientTask
    from spafl.config import build_config
    from spafl.data import preprocess_for

    spec = ModelSpec(factory=Conv4, input_shape=(3, 32, 32), num_classes=10)
    config = build_config("cifar10-paper", overrides={
        "method": method, "num_clients": 4, "clients_per_round": 2, "local_epochs": 1, "batch_size": 4,
    })
    algo = ALGORITHMS[method](config, spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (9, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (9,), generator=g)
    data = ClientData(x, y, x[:5], y[:5], preprocess_for("cifar10", "normalized"), 10)
    server = algo.init_server(spec.initial_state(0))
    client = 3  # heterofl: rate 1/8 (3 * 5 // 4); fjord: its tier
    down = algo.server_message(server, client, 0)
    result = algo.client_update(algo.init_client(client, None), down, data, ClientTask(client, 0, 0))
    assert {k for k in down if "bn" in k} == {f"weights/bn{i}.{p}" for i in range(1, 7) for p in ("weight", "bias")}
    assert {k: v.shape for k, v in result.message.items() if k.startswith("weights/")} == {k: v.shape for k, v in down.items()}
    assert result.stats["steps"] == 2 and not torch.equal(result.message["weights/bn1.weight"], down["weights/bn1.weight"])
    evaluation = algo.evaluate(algo.evaluation_state(result.state, server), data, batch_size=100)
    assert evaluation.num_test == 5 and 0 <= evaluation.correct <= 5 and evaluation.loss_sum > 0


@pytest.mark.parametrize("method", ["heterofl", "fjord"])
def test_a_client_without_training_data_changes_nothing(method, monkeypatch):
    from spafl.algorithms import ALGORITHMS, ClientData, ClientTask, Reply
    from spafl.config import build_config

    monkeypatch.setitem(WIDTH_TABLES, Tiny, TINY_TABLE)
    config = build_config("fmnist-quick", overrides={"method": method, "num_clients": 4, "clients_per_round": 2, "batch_size": 4})
    algo = ALGORITHMS[method](config, ModelSpec(factory=Tiny, input_shape=(1, 2, 2), num_classes=2))
    data = tiny_data(n=8)
    empty = ClientData(data.train_x[:0], data.train_y[:0], data.test_x, data.test_y, data.preprocess, 2)
    server = algo.init_server(ModelSpec(factory=Tiny, input_shape=(1, 2, 2), num_classes=2).initial_state(0))
    result = algo.client_update(algo.init_client(3, None), algo.server_message(server, 3, 0), empty, ClientTask(3, 0, 0))
    assert result.stats["steps"] == 0 and result.stats["flops"] == 0 and result.stats["num_samples"] == 0
    assert algo.validate_reply(server, Reply(3, result.message, 0)) is None
    new = algo.aggregate(server, [Reply(3, result.message, 0)], 0)["model"]
    assert all(torch.equal(new[name], server["model"][name]) for name in server["model"])
    assert algo.evaluate(algo.evaluation_state(result.state, server), empty, 100).num_test == 4
