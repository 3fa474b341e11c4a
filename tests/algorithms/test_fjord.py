"""FjORD: tiers per client, ordered dropout (a width per step, gradients only in its block), nested
sample-weighted aggregation, exact bits, FLOPs over the drawn widths, evaluation at p_max, resume and Flower."""

import pytest
import torch

from spafl.algorithms import ALGORITHMS, ClientTask, Reply
from spafl.algorithms import fjord as fjord_module
from spafl.algorithms.fjord import FjORD, OrderedDropout
from spafl.algorithms.widths import WIDTH_TABLES, prefix, width_units
from spafl.config import Config, build_config, keys_of
from spafl.errors import UserError
from spafl.metrics import message_bits

from .runs import assert_flower_equals_inprocess, assert_resume_is_identical, needs_flower, recorded_run
from .test_heterofl import lenet_macs
from .test_widths import TINY_TABLE, lenet_weights
from .tiny import SPEC, Tiny, tiny_data


@pytest.fixture
def tiny_table(monkeypatch):
    monkeypatch.setitem(WIDTH_TABLES, Tiny, TINY_TABLE)


def fjord(**overrides):
    """FjORD on the tiny model (fc1 4 -> 3 hidden, fc2 3 -> 2 classes), widths 1/3 (1 unit), 2/3 (2 units), 1."""
    values = {
        "method": "fjord", "num_clients": 6, "clients_per_round": 2, "local_epochs": 1, "batch_size": 2, "lr": 0.1,
        "fjord_widths": "0.3,0.6,1",
    }
    return FjORD(build_config("fmnist-quick", overrides={**values, **overrides}), SPEC)


def test_registered_with_its_keys_and_defaults():
    assert ALGORITHMS["fjord"] is FjORD and not FjORD.personal_evaluation
    assert keys_of("fjord") == {"fjord_widths", "fjord_distill"}
    assert (Config().fjord_widths, Config().fjord_distill) == ("0.2,0.4,0.6,0.8,1.0", False)
    with pytest.raises(UserError, match="^fjord_widths must"):
        build_config(None, None, {"fjord_widths": "0.5,2"})
    with pytest.raises(UserError, match="^fjord_distill=true: FjORD's self-distillation is not implemented"):
        fjord(fjord_distill=True)


def test_tiers_are_uniform_per_client_from_the_seed(tiny_table):
    algo = fjord(num_clients=300)
    tiers = [algo.tier_of(k) for k in range(300)]
    assert tiers == [algo.tier_of(k) for k in range(300)] and set(tiers) == {0.3, 0.6, 1.0}
    assert all(60 < tiers.count(w) < 140 for w in (0.3, 0.6, 1.0))
    assert tiers != [fjord(num_clients=300, seed=1).tier_of(k) for k in range(300)]
    assert algo.init_client(5, None) == {"width": tiers[5]}
    server = algo.init_server(SPEC.initial_state(0))
    for k in range(6):
        units = width_units(tiers[k], 3)
        assert {n: tuple(t.shape) for n, t in algo.server_message(server, k, 0).items()} == {
            "weights/fc1.weight": (units, 4), "weights/fc2.weight": (2, units),
        }
        assert {n: tuple(t.shape) for n, t in algo.evaluation_state(algo.init_client(k, None), server).items()} == {
            "fc1.weight": (units, 4), "fc2.weight": (2, units),
        }


def test_each_step_trains_one_drawn_width_and_only_its_block(tiny_table):
    algo = fjord()
    model = algo.sliced_model(1.0)
    narrower = {0.3: algo.sliced_model(0.3), 0.6: algo.sliced_model(0.6)}
    macs = {0.3: 1 * 4 + 2 * 1, 0.6: 2 * 4 + 2 * 2, 1.0: 3 * 4 + 2 * 3}
    dropout = OrderedDropout(model, 1.0, narrower, algo.shapes, macs, torch.Generator().manual_seed(0))
    half = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = torch.cat([half, -half])  # no biases: every hidden unit is active on x or on -x, so no block's gradient is zero
    dropout.train()
    for _ in range(12):
        model.zero_grad(set_to_none=True)
        logits = dropout(x)
        width = dropout.drawn[-1]
        sub = narrower.get(width, model)
        reference = {n: t[prefix(algo.shapes[width][n])] for n, t in model.state_dict().items() if n in algo.shapes[width]}
        expected = torch.func.functional_call(sub, reference, (x,))
        torch.testing.assert_close(logits, expected)
        logits.square().sum().backward()
        for name, parameter in model.named_parameters():
            if name not in algo.shapes[1.0]:
                continue
            inside = parameter.grad[prefix(algo.shapes[width][name])]
            outside = parameter.grad.clone()
            outside[prefix(algo.shapes[width][name])] = 0
            assert inside.abs().sum() > 0 and outside.abs().sum() == 0, (width, name)
    assert set(dropout.drawn) == {0.3, 0.6, 1.0}
    assert dropout.macs_run == 4 * sum(macs[w] for w in dropout.drawn)
    dropout.eval()
    torch.testing.assert_close(dropout(x), model(x))


def test_client_update_draws_widths_up_to_its_tier_and_counts_their_flops(tiny_table, monkeypatch):
    algo = fjord()
    client = next(k for k in range(6) if algo.tier_of(k) == 0.6)
    made = []

    class Recorded(OrderedDropout):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fjord_module, "OrderedDropout", Recorded)
    server = algo.init_server(SPEC.initial_state(0))
    down = algo.server_message(server, client, 0)
    data = tiny_data(n=16)
    result = algo.client_update(algo.init_client(client, None), down, data, ClientTask(client, 0, 0))
    (dropout,) = made
    assert len(dropout.drawn) == result.stats["steps"] == 8 and set(dropout.drawn) <= {0.3, 0.6}
    assert result.stats["flops"] == 3 * sum(2 * {0.3: 6, 0.6: 12}[w] for w in dropout.drawn)  # batches of 2
    assert {k: v.shape for k, v in result.message.items()} == {k: v.shape for k, v in down.items()}
    assert message_bits(result.message) == message_bits(down) == (8 + 4) * 32
    assert not torch.equal(result.message["weights/fc1.weight"], down["weights/fc1.weight"])
    assert result.state == {"width": 0.6}
    assert algo.validate_reply(server, Reply(client, result.message, 16)) is None
    other = next(k for k in range(6) if algo.tier_of(k) == 1.0)
    assert "width 0.6" in algo.validate_reply(server, Reply(client, algo.server_message(server, other, 0), 16))
    with pytest.raises(ValueError, match="not a slice at its width"):
        algo.client_update({}, down, data, ClientTask(other, 0, 0))


def test_aggregation_is_the_sample_weighted_mean_over_the_clients_holding_each_coordinate(tiny_table):
    algo = fjord()
    initial = SPEC.initial_state(0)
    server = {"model": {**initial, "fc1.weight": torch.full((3, 4), 9.0), "fc2.weight": torch.full((2, 3), 9.0)}}

    def message(units, value):
        return {"weights/fc1.weight": torch.full((units, 4), value), "weights/fc2.weight": torch.full((2, units), value)}

    replies = [Reply(0, message(1, 1.0), 1), Reply(1, message(2, 4.0), 3), Reply(2, message(2, 10.0), 0)]
    new = algo.aggregate(server, replies, 0)["model"]
    # unit 0: (1 * 1 + 4 * 3) / 4; unit 1: only the 2-unit client with samples; unit 2: nobody -> kept
    assert new["fc1.weight"].tolist() == [[3.25] * 4, [4.0] * 4, [9.0] * 4]
    assert new["fc2.weight"].tolist() == [[3.25, 4.0, 9.0]] * 2
    assert torch.equal(new["fc1.threshold"], initial["fc1.threshold"]) and server["model"]["fc1.weight"][0, 0] == 9.0
    idle = [Reply(r.client_id, r.message, 0) for r in replies]
    assert algo.aggregate(server, idle, 0)["model"]["fc1.weight"].tolist() == [[9.0] * 4] * 3


def test_lenet_bits_per_round_are_the_formula_and_evaluation_is_at_p_max(tmp_path, synthetic):
    rows, simulator, uploads = recorded_run(tmp_path, synthetic, "fjord")
    algo = simulator.algorithm
    tiers = [algo.tier_of(k) for k in range(4)]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        expected = sum(32 * lenet_weights(tiers[k]) for k in row["sampled"])
        assert row["bits_down"] == row["bits_up"] == expected
    assert rows[-1]["bits_cum"] == sum(r["bits_up"] + r["bits_down"] for r in rows)
    # FLOPs between every step at the smallest width and every step at p_max
    sizes = [c.num_train for c in simulator.federation.clients]
    low = sum(3 * sizes[k] * lenet_macs(0.2) for r in rows[1:] for k in r["sampled"]) / 4
    high = sum(3 * sizes[k] * lenet_macs(tiers[k]) for r in rows[1:] for k in r["sampled"]) / 4
    assert low < rows[-1]["flops_cum"] <= high
    # evaluation at each client's p_max: density = that slice's share of the full model (layer mean, and by weights)
    layer_mean = [
        sum(x / y for x, y in zip(layer_sizes(t), layer_sizes(1.0))) / 4 for t in tiers
    ]
    assert rows[-1]["density"] == pytest.approx(sum(layer_mean) / 4)
    assert rows[-1]["density_weighted"] == pytest.approx(sum(lenet_weights(t) / 430_500 for t in tiers) / 4)


def layer_sizes(width):
    c1, c2, f1 = width_units(width, 20), width_units(width, 50), width_units(width, 500)
    return [c1 * 25, c2 * c1 * 25, f1 * c2 * 16, 10 * f1]


def test_resume_gives_identical_metrics(tmp_path, synthetic, monkeypatch):
    assert_resume_is_identical(tmp_path, synthetic, "fjord", monkeypatch)


@needs_flower
def test_flower_strategy_over_local_grid_equals_inprocess(tmp_path):
    assert_flower_equals_inprocess(tmp_path, "fjord")
