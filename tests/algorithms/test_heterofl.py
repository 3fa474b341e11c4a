"""HeteroFL: rates per client, the sliced client step (scaler, label split), count-based covered aggregation,
exact bits, FLOPs, resume and Flower."""

import pytest
import torch

from spafl.algorithms import ALGORITHMS, ClientData, ClientTask, Reply
from spafl.algorithms.heterofl import HeteroFL
from spafl.algorithms.widths import WIDTH_TABLES, width_units
from spafl.config import Config, build_config, keys_of
from spafl.errors import UserError
from spafl.metrics import message_bits

from .runs import assert_flower_equals_inprocess, assert_resume_is_identical, needs_flower, recorded_run
from .test_widths import TINY_TABLE, lenet_weights
from .tiny import SPEC, Tiny, tiny_data

KEYS = {"heterofl_rates", "heterofl_mode", "heterofl_label_split"}


@pytest.fixture
def tiny_table(monkeypatch):
    monkeypatch.setitem(WIDTH_TABLES, Tiny, TINY_TABLE)


def heterofl(**overrides):
    """HeteroFL on the tiny model (fc1 4 -> 3 hidden, fc2 3 -> 2 classes); rates 1 and 1/2; clients 0, 1 of rate 1, 2, 3 of 1/2."""
    values = {"method": "heterofl", "num_clients": 4, "clients_per_round": 2, "local_epochs": 1, "batch_size": 4, "lr": 0.1, "heterofl_rates": "1,0.5"}
    return HeteroFL(build_config("fmnist-quick", overrides={**values, **overrides}), SPEC)


def test_registered_with_its_keys_and_defaults():
    assert ALGORITHMS["heterofl"] is HeteroFL and not HeteroFL.personal_evaluation
    assert keys_of("heterofl") == KEYS
    defaults = Config()
    assert (defaults.heterofl_rates, defaults.heterofl_mode, defaults.heterofl_label_split) == ("1,0.5,0.25,0.125,0.0625", "fix", True)
    for bad in ("0,1", "1,1.5", "1,x", "1,1", ""):
        with pytest.raises(UserError, match="^heterofl_rates must"):
            build_config(None, None, {"heterofl_rates": bad})
    with pytest.raises(UserError, match="^heterofl_mode must be one of fix, dynamic"):
        build_config(None, None, {"heterofl_mode": "x"})


def test_rates_fix_equal_groups_in_client_order_or_dynamic_per_round(tiny_table):
    algo = heterofl(num_clients=10, heterofl_rates="1,0.5,0.25,0.125,0.0625")
    assert [algo.rate_of(k, 0) for k in range(10)] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625]
    assert all(algo.rate_of(k, 7) == algo.rate_of(k, 0) for k in range(10))
    dynamic = heterofl(num_clients=10, heterofl_rates="1,0.5,0.25,0.125,0.0625", heterofl_mode="dynamic")
    draws = [[dynamic.rate_of(k, t) for t in range(20)] for k in range(10)]
    assert draws == [[dynamic.rate_of(k, t) for t in range(20)] for k in range(10)]  # a function of (seed, client, round)
    assert all(len(set(row)) > 1 for row in draws) and {r for row in draws for r in row} == set(dynamic.rates)


def test_messages_are_the_slices_at_the_clients_rate(tiny_table):
    algo = heterofl()
    server = algo.init_server(SPEC.initial_state(0))
    full = algo.server_message(server, 0, 0)
    half = algo.server_message(server, 2, 0)
    assert {k: tuple(v.shape) for k, v in full.items()} == {"weights/fc1.weight": (3, 4), "weights/fc2.weight": (2, 3)}
    assert {k: tuple(v.shape) for k, v in half.items()} == {"weights/fc1.weight": (2, 4), "weights/fc2.weight": (2, 2)}
    assert torch.equal(half["weights/fc2.weight"], server["model"]["fc2.weight"][:, :2])
    assert message_bits(half) == (8 + 4) * 32 and message_bits(full) == (12 + 6) * 32


def test_scaler_divides_hidden_outputs_by_the_rate_in_training_and_label_split_zeroes_absent_logits(tiny_table):
    algo = heterofl()
    model = algo.sliced_model(0.5)
    x = torch.randn(5, 1, 2, 2)
    model.eval()
    plain = model(x).detach()
    handles = algo._hooks(model, 0.5, torch.tensor([True, False]))
    model.train()
    trained = model(x).detach()
    model.eval()
    evaluated = model(x).detach()
    for handle in handles:
        handle.remove()
    # one hidden layer before a linear output: ReLU(h / r) W = (ReLU(h) W) / r
    torch.testing.assert_close(trained[:, 0], plain[:, 0] / 0.5)
    assert torch.all(trained[:, 1] == 0)  # label 1 is absent
    assert torch.equal(evaluated, plain)  # both are identities in evaluation


def test_client_update_trains_the_slice_and_sends_it_with_its_label_set(tiny_table):
    algo = heterofl()
    server = algo.init_server(SPEC.initial_state(0))
    one_class = tiny_data(n=8)
    data = ClientData(one_class.train_x, torch.zeros(8, dtype=torch.long), one_class.test_x, one_class.test_y, one_class.preprocess, 2)
    down = algo.server_message(server, 2, 0)
    result = algo.client_update({}, down, data, ClientTask(2, 0, 0))
    assert result.state == {}
    assert set(result.message) == {"weights/fc1.weight", "weights/fc2.weight", "labels"}
    assert result.message["labels"].tolist() == [True, False] and result.message["labels"].dtype == torch.bool
    assert message_bits(result.message) == message_bits(down) + 2
    assert not torch.equal(result.message["weights/fc1.weight"], down["weights/fc1.weight"])
    # the row of the absent label got no gradient (its logit is the constant 0), the present one did
    assert torch.equal(result.message["weights/fc2.weight"][1], down["weights/fc2.weight"][1])
    assert not torch.equal(result.message["weights/fc2.weight"][0], down["weights/fc2.weight"][0])
    # FLOPs at the rate-1/2 shapes: 3 * E * n * (fc1 2*4 + fc2 2*2)
    assert result.stats["flops"] == 3 * 1 * 8 * 12 and result.stats["steps"] == 2
    assert algo.validate_reply(server, Reply(2, result.message, 8)) is None
    assert "width 0.5" in algo.validate_reply(server, Reply(2, algo.server_message(server, 0, 0) | {"labels": data.train_y[:2] == 0}, 8))
    assert "missing" in algo.validate_reply(server, Reply(2, down, 8))  # no label mask
    with pytest.raises(ValueError, match="not a slice at its rate"):
        algo.client_update({}, down, data, ClientTask(0, 0, 0))  # client 0 trains at rate 1
    without = heterofl(heterofl_label_split=False).client_update({}, down, data, ClientTask(2, 0, 0))
    assert set(without.message) == set(down)


def replies():
    def message(fc1_rows, value, labels):
        return {
            "weights/fc1.weight": torch.full((fc1_rows, 4), value), "weights/fc2.weight": torch.full((2, fc1_rows), value),
            "labels": torch.tensor(labels),
        }

    return [
        Reply(0, message(3, 1.0, [True, False]), num_samples=5),  # rate 1
        Reply(2, message(2, 3.0, [True, True]), num_samples=1),  # rate 1/2
        Reply(3, message(2, 5.0, [False, True]), num_samples=2),  # rate 1/2
    ]


def test_aggregation_is_the_plain_mean_over_the_clients_holding_each_coordinate_and_label(tiny_table):
    algo = heterofl()
    initial = SPEC.initial_state(0)
    server = {"model": {**initial, "fc1.weight": torch.full((3, 4), 9.0), "fc2.weight": torch.full((2, 3), 9.0)}}
    assert all(algo.validate_reply(server, r) is None for r in replies())
    new = algo.aggregate(server, replies(), 0)["model"]
    # fc1 rows 0-1: (1 + 3 + 5) / 3 (counts, not samples); row 2: only the rate-1 client
    assert new["fc1.weight"].tolist() == [[3.0] * 4, [3.0] * 4, [1.0] * 4]
    # fc2 (rows = classes): label 0 held by clients 0, 2; label 1 by 2, 3; column 2 only in client 0's slice
    assert new["fc2.weight"].tolist() == [[2.0, 2.0, 1.0], [4.0, 4.0, 9.0]]
    assert torch.equal(new["fc1.threshold"], initial["fc1.threshold"]) and server["model"]["fc1.weight"][0, 0] == 9.0
    plain = heterofl(heterofl_label_split=False).aggregate(server, [Reply(r.client_id, {k: v for k, v in r.message.items() if k != "labels"}, r.num_samples) for r in replies()], 0)
    assert plain["model"]["fc2.weight"].tolist() == [[3.0, 3.0, 1.0], [3.0, 3.0, 1.0]]
    # a client without samples trained nothing and counts 0; no replies: unchanged
    idle = [Reply(r.client_id, r.message, 0 if r.client_id == 0 else r.num_samples) for r in replies()]
    assert algo.aggregate(server, idle, 0)["model"]["fc1.weight"][2].tolist() == [9.0] * 4
    assert algo.aggregate(server, [], 0)["model"]["fc1.weight"].tolist() == server["model"]["fc1.weight"].tolist()


def lenet_macs(r: float) -> int:
    c1, c2, f1 = width_units(r, 20), width_units(r, 50), width_units(r, 500)
    return c1 * 25 * 24 * 24 + c2 * c1 * 25 * 8 * 8 + f1 * c2 * 16 + 10 * f1


def test_lenet_bits_per_round_are_the_formula_and_flops_the_sliced_sizes(tmp_path, synthetic):
    rows, simulator, uploads = recorded_run(tmp_path, synthetic, "heterofl")
    algo = simulator.algorithm
    assert [algo.rate_of(k, 0) for k in range(4)] == [1, 0.5, 0.25, 0.125]  # 4 clients, 5 rates: k * 5 // 4
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        rates = [algo.rate_of(k, row["round"] - 1) for k in row["sampled"]]
        assert row["bits_down"] == sum(32 * lenet_weights(r) for r in rates)
        assert row["bits_up"] == sum(32 * lenet_weights(r) + 10 for r in rates)  # + the 10-bit label mask
        for k in row["sampled"]:
            assert uploads[row["round"] - 1, k][0]["weights/fc1.weight"].shape == (width_units(algo.rate_of(k, 0), 500), width_units(algo.rate_of(k, 0), 50) * 16)
    assert rows[-1]["bits_cum"] == sum(r["bits_up"] + r["bits_down"] for r in rows)
    sizes = [c.num_train for c in simulator.federation.clients]
    expected = sum(3 * sizes[k] * lenet_macs(algo.rate_of(k, 0)) for r in rows[1:] for k in r["sampled"]) / 4
    assert rows[-1]["flops_cum"] == pytest.approx(expected)
    assert all(r["density"] == 1.0 and r["density_weighted"] == 1.0 for r in rows)  # the global model, full width


def test_resume_gives_identical_metrics(tmp_path, synthetic, monkeypatch):
    assert_resume_is_identical(tmp_path, synthetic, "heterofl", monkeypatch)


@needs_flower
def test_flower_strategy_over_local_grid_equals_inprocess(tmp_path):
    assert_flower_equals_inprocess(tmp_path, "heterofl")
