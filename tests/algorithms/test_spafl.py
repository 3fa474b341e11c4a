"""SpaFL client update and aggregation on hand-made layers and messages (SPEC §3-§4)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spafl.algorithms import ClientTask, Reply, SpaFL
from spafl.algorithms.local_sgd import round_lr
from spafl.algorithms.spafl import add_penalty_gradient, importance_update, threshold_penalty_coefficient
from spafl.fast.step import momentum_step, steps_by_rows
from spafl.config import build_config
from spafl.metrics import message_bits
from spafl.nn import MaskedConv2d, MaskedLinear, masked_layers

from .tiny import SPEC, Tiny, tiny_data


def tiny_linear():
    layer = MaskedLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.6, 0.1], [-0.2, -0.4, 0.9]]))
    return nn.Sequential(layer)


def test_importance_update_row_sum_on_a_linear_layer():
    model = tiny_linear()
    # row sums: -0.2 (sign -1) and 0.3 (sign +1); n' = in = 3
    importance_update(model, {"0": torch.tensor([0.3, -0.6])}, "row_sum")
    expected = [[0.3 + 0.1, -0.6 + 0.1, 0.1 + 0.1], [-0.2 + 0.2, -0.4 + 0.2, 0.9 + 0.2]]
    assert model[0].weight.tolist() == [pytest.approx(row) for row in expected]


def test_importance_update_per_weight_on_a_linear_layer():
    model = tiny_linear()
    importance_update(model, {"0": torch.tensor([0.3, -0.6])}, "per_weight")
    # W_ij -= delta_i * sign(W_ij) / 3: a rising threshold shrinks |W|, a falling one grows it
    expected = [[0.3 - 0.1, -0.6 + 0.1, 0.1 - 0.1], [-0.2 - 0.2, -0.4 - 0.2, 0.9 + 0.2]]
    assert model[0].weight.tolist() == [pytest.approx(row) for row in expected]


def test_importance_update_conv_divides_by_kernel_area_only():
    conv = MaskedConv2d(2, 1, kernel_size=2)
    with torch.no_grad():
        conv.weight.fill_(0.5)
    importance_update(nn.Sequential(conv), {"0": torch.tensor([0.8])}, "row_sum")
    # n' = kh*kw = 4 (not in*kh*kw = 8): 0.5 - 0.8 / 4
    assert torch.allclose(conv.weight, torch.full_like(conv.weight, 0.3))


def test_penalty_warmup_and_lr_schedule():
    assert threshold_penalty_coefficient(0.002, 0.0, 7) == 0.002
    assert threshold_penalty_coefficient(0.002, 1.0, 0) == pytest.approx(0.002 / (1 + math.exp(5)))
    assert threshold_penalty_coefficient(0.002, 1.0, 1) == pytest.approx(0.002 / (1 + math.exp(-5)))
    assert threshold_penalty_coefficient(0.002, 2.0, 1) == pytest.approx(0.001)
    assert round_lr(0.01, 0.993, 1e-4, 10) == pytest.approx(0.01 * 0.993**10)
    assert round_lr(0.01, 0.993, 1e-4, 2000) == 1e-4


# -- the full algorithm on a tiny model -------------------------------------------------

def algorithm(**overrides):
    config = build_config("fmnist-paper", overrides={"local_epochs": 1, "batch_size": 4, "lr": 0.1, **overrides})
    return SpaFL(config, SPEC)


def down_message(algo, fc1, fc2):
    """What the server sends when tau_g = (fc1, fc2) and the thresholds did not change last round."""
    tau = {"fc1": torch.tensor(fc1), "fc2": torch.tensor(fc2)}
    server = {"thresholds": tau, "delta": {k: torch.zeros_like(v) for k, v in tau.items()}}
    return algo.server_message(server, 0, 0)


def thresholds_message(values):
    return {f"thresholds/{name}": torch.tensor(v) for name, v in values.items()}


def test_penalty_gradient_is_what_autograd_gives_bit_for_bit():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.fc1.threshold.copy_(torch.tensor([0.3, -0.2, 0.05]))
        model.fc2.threshold.copy_(torch.tensor([-0.7, 0.4]))
    thresholds = [model.fc1.threshold, model.fc2.threshold]
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 1, 0, 1])
    coefficient = 0.0023
    (F.cross_entropy(model(x), y) + coefficient * sum(torch.exp(-t).sum() for t in thresholds)).backward()
    with_penalty = [t.grad.clone() for t in thresholds]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    loss_only = [t.grad.clone() for t in thresholds]
    add_penalty_gradient(thresholds, coefficient)
    assert all(torch.equal(t.grad, expected) for t, expected in zip(thresholds, with_penalty))
    assert not any(torch.equal(a, b) for a, b in zip(loss_only, with_penalty))
    # a threshold the loss does not reach gets -c * exp(-tau) alone
    lone = torch.tensor([0.0, 1.0], requires_grad=True)
    add_penalty_gradient([lone], coefficient)
    assert lone.grad.tolist() == pytest.approx([-coefficient, -coefficient * math.exp(-1.0)], rel=1e-6)


def test_momentum_step_from_kept_rows_is_sgd_bit_for_bit():
    """Three steps: the first creates the buffers, a frozen parameter (no gradient) is skipped, a dense gradient is taken as it is."""
    generator = torch.Generator().manual_seed(6)
    shapes = [(6, 4), (5, 2, 3, 3), (4,), (3,)]
    by_rows = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    by_sgd = [p.detach().clone().requires_grad_() for p in by_rows]
    optimizers = [torch.optim.SGD(params, lr=0.05, momentum=0.9) for params in (by_rows, by_sgd)]
    assert steps_by_rows(optimizers[0])
    kept = [torch.tensor([0, 3, 4]), torch.tensor([2])]
    for step in range(3):
        rows = {}
        for position, index in enumerate(kept):
            values = torch.randn((index.numel(), *shapes[position][1:]), generator=generator)
            rows[by_rows[position]] = (index, values)
            by_sgd[position].grad = torch.zeros(shapes[position]).index_copy_(0, index, values)
        by_rows[2].grad = torch.randn(4, generator=generator)
        by_sgd[2].grad = by_rows[2].grad.clone()
        if step == 1:  # the last parameter trains in the first and last step only
            by_rows[3].grad = by_sgd[3].grad = None
        else:
            by_rows[3].grad = torch.randn(3, generator=generator)
            by_sgd[3].grad = by_rows[3].grad.clone()
        momentum_step(optimizers[0], rows)
        optimizers[1].step()
        for mine, theirs in zip(by_rows, by_sgd):
            assert torch.equal(mine, theirs)
            assert torch.equal(optimizers[0].state[mine]["momentum_buffer"], optimizers[1].state[theirs]["momentum_buffer"])
    assert not torch.equal(by_rows[0][1], by_rows[0][1] + 1)  # rows without gradient moved by momentum only
    parameter = [torch.zeros(2, requires_grad=True)]
    assert not steps_by_rows(torch.optim.SGD(parameter, lr=0.1, momentum=0.9, weight_decay=1e-4))
    assert not steps_by_rows(torch.optim.SGD(parameter, lr=0.1, momentum=0.9, nesterov=True))
    assert not steps_by_rows(torch.optim.SGD(parameter, lr=0.1))
    assert not steps_by_rows(torch.optim.Adam(parameter, lr=0.1))


def test_aggregation_uniform_and_sample_weighted_and_delta():
    algo = algorithm()
    server = algo.init_server(SPEC.initial_state(0))
    replies = [
        Reply(0, thresholds_message({"fc1": [0.0, 0.3, 0.6], "fc2": [1.0, 1.0]}), num_samples=1),
        Reply(1, thresholds_message({"fc1": [0.3, 0.3, 0.0], "fc2": [0.0, 2.0]}), num_samples=3),
    ]
    new = algo.aggregate(server, replies, 0)
    assert new["thresholds"]["fc1"].tolist() == pytest.approx([0.15, 0.3, 0.3])
    assert new["thresholds"]["fc2"].tolist() == pytest.approx([0.5, 1.5])
    assert new["delta"]["fc2"].tolist() == pytest.approx([0.5, 1.5])  # from tau_g(0) = 0
    again = algo.aggregate(new, replies[:1], 1)
    assert again["delta"]["fc1"].tolist() == pytest.approx([-0.15, 0.0, 0.3])
    weighted = algorithm(aggregation_weighting="samples").aggregate(server, replies, 0)
    assert weighted["thresholds"]["fc1"].tolist() == pytest.approx([0.225, 0.3, 0.15])
    assert algo.aggregate(new, [], 2)["delta"]["fc1"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "update,delta_mode,down_tensors,broadcast",
    [
        ("before_training", "server_sends", {"thresholds", "delta"}, None),
        ("before_training", "since_last_seen", {"thresholds"}, None),
        ("all_after_aggregation", "server_sends", {"thresholds"}, "delta"),
        ("all_after_aggregation", "since_last_seen", {"thresholds"}, "thresholds"),
        ("off", "server_sends", {"thresholds"}, None),
    ],
)
def test_messages_carry_exactly_what_each_variant_needs(update, delta_mode, down_tensors, broadcast):
    algo = algorithm(importance_update=update, importance_delta=delta_mode)
    server = algo.init_server(SPEC.initial_state(0))
    down = algo.server_message(server, 0, 0)
    assert {name.split("/")[0] for name in down} == down_tensors
    # 5 thresholds of 32 bits per tensor group
    assert message_bits(down) == 5 * 32 * len(down_tensors)
    message = algo.broadcast_message(server, 0)
    if broadcast is None:
        assert message is None
    else:
        assert {name.split("/")[0] for name in message} == {broadcast} and message_bits(message) == 5 * 32


def _client_after_update(update, delta_mode, sign, last_seen=None):
    algo = algorithm(importance_update=update, importance_delta=delta_mode, importance_sign=sign, lr=1e-12, th_coeff=0.0)
    initial = SPEC.initial_state(0)
    client = algo.init_client(0, initial)
    if last_seen is not None:
        client["last_seen"] = last_seen
    tau_g = {"fc1": torch.tensor([0.2, 0.2, 0.2]), "fc2": torch.tensor([0.1, -0.1])}
    server = {"thresholds": tau_g, "delta": {"fc1": torch.tensor([0.3, 0.0, -0.3]), "fc2": torch.tensor([0.0, 0.6])}}
    down = algo.server_message(server, 0, 3)
    result = algo.client_update(client, down, tiny_data(), ClientTask(0, 3, 0))
    return initial, result


def test_client_update_before_training_applies_the_server_delta():
    initial, result = _client_after_update("before_training", "server_sends", "row_sum")
    w0 = initial["fc1.weight"]
    expected = w0 - torch.tensor([0.3, 0.0, -0.3]).view(-1, 1) * torch.sign(w0.sum(1, keepdim=True)) / 4
    # lr 1e-12: training barely moves the weights, so what changed them is the importance update
    assert torch.allclose(result.state["model"]["fc1.weight"], expected, atol=1e-6)
    assert set(result.message) == {"thresholds/fc1", "thresholds/fc2"}
    assert message_bits(result.message) == 5 * 32


def test_client_update_since_last_seen_uses_its_own_memory():
    last = {"fc1": torch.tensor([0.2, 0.5, 0.0]), "fc2": torch.tensor([0.1, -0.1])}
    initial, result = _client_after_update("before_training", "since_last_seen", "per_weight", last_seen=last)
    w0 = initial["fc1.weight"]
    delta = torch.tensor([0.0, -0.3, 0.2]).view(-1, 1)  # tau_g - last seen
    assert torch.allclose(result.state["model"]["fc1.weight"], w0 - delta * torch.sign(w0) / 4, atol=1e-6)
    assert torch.allclose(result.state["model"]["fc2.weight"], initial["fc2.weight"], atol=1e-6)
    assert result.state["last_seen"]["fc1"].tolist() == pytest.approx([0.2, 0.2, 0.2])


def test_client_update_off_and_all_after_aggregation_leave_weights_before_training():
    for update in ("off", "all_after_aggregation"):
        initial, result = _client_after_update(update, "server_sends", "row_sum")
        assert torch.allclose(result.state["model"]["fc1.weight"], initial["fc1.weight"], atol=1e-6)


def test_all_after_aggregation_broadcast_updates_every_client():
    algo = algorithm(importance_update="all_after_aggregation")
    initial = SPEC.initial_state(0)
    client = algo.init_client(7, initial)
    server = {"thresholds": {"fc1": torch.zeros(3), "fc2": torch.zeros(2)},
              "delta": {"fc1": torch.tensor([0.4, 0.0, 0.0]), "fc2": torch.zeros(2)}}
    updated = algo.client_receive(client, algo.broadcast_message(server, 0), 0)
    w0 = initial["fc1.weight"]
    assert torch.allclose(updated["model"]["fc1.weight"][0], w0[0] - 0.4 * torch.sign(w0[0].sum()) / 4)
    assert torch.equal(updated["model"]["fc1.weight"][1:], w0[1:])
    assert client["model"] is initial  # the old state is not modified in place


def test_thresholds_are_copied_trained_and_uploaded():
    algo = algorithm(th_coeff=0.5, th_coeff_warmup=0.0)
    client = algo.init_client(0, SPEC.initial_state(0))
    down = down_message(algo, [0.01] * 3, [0.01] * 2)
    result = algo.client_update(client, down, tiny_data(), ClientTask(0, 0, 0))
    up = result.message["thresholds/fc1"]
    assert up.shape == (3,) and up.dtype == torch.float32
    # the exp(-tau) penalty pushes every threshold up from the broadcast value
    assert (up > 0.01).all()
    assert result.stats["steps"] == 2 and result.stats["num_samples"] == 8


def test_last_epoch_schedule_freezes_thresholds_until_the_last_epoch():
    algo = algorithm(threshold_schedule="last_epoch", local_epochs=1, th_coeff=0.5, th_coeff_warmup=0.0)
    client = algo.init_client(0, SPEC.initial_state(0))
    zero = down_message(algo, [0.0] * 3, [0.0] * 2)
    moved = algo.client_update(client, zero, tiny_data(), ClientTask(0, 0, 0)).message
    assert (moved["thresholds/fc1"] > 0).all()  # E=1: the only epoch is the last
    frozen = algorithm(threshold_schedule="last_epoch", local_epochs=2, th_coeff=0.5, th_coeff_warmup=0.0, lr=0.1)
    result = frozen.client_update(frozen.init_client(0, SPEC.initial_state(0)), zero, tiny_data(), ClientTask(0, 0, 0))
    every = algorithm(local_epochs=2, th_coeff=0.5, th_coeff_warmup=0.0, lr=0.1)
    both = every.client_update(every.init_client(0, SPEC.initial_state(0)), zero, tiny_data(), ClientTask(0, 0, 0))
    # half the threshold steps: a smaller rise than training thresholds in both epochs
    assert (result.message["thresholds/fc1"] < both.message["thresholds/fc1"]).all()


def test_frozen_weights_trains_thresholds_only():
    algo = algorithm(frozen_weights=True, th_coeff=0.5, th_coeff_warmup=0.0)
    initial = SPEC.initial_state(0)
    client = algo.init_client(0, initial)
    zero = {"thresholds/fc1": torch.zeros(3), "thresholds/fc2": torch.zeros(2)}
    result = algo.client_update(client, zero, tiny_data(), ClientTask(0, 0, 0))
    assert torch.equal(result.state["model"]["fc1.weight"], initial["fc1.weight"])
    assert (result.message["thresholds/fc1"] != 0).any()


def test_persistent_optimizer_keeps_momentum_and_per_round_does_not():
    persistent = algorithm()
    zero = down_message(persistent, [0.0] * 3, [0.0] * 2)
    state = persistent.client_update(persistent.init_client(0, SPEC.initial_state(0)), zero, tiny_data(), ClientTask(0, 0, 0)).state
    assert state["optimizer"]["state"] and "momentum_buffer" in state["optimizer"]["state"][0]
    fresh = algorithm(optimizer_scope="per_round")
    assert fresh.client_update(fresh.init_client(0, SPEC.initial_state(0)), zero, tiny_data(), ClientTask(0, 0, 0)).state["optimizer"] is None


def test_reply_validation_rejects_wrong_names_shapes_dtypes_and_nan():
    algo = algorithm()
    server = algo.init_server(SPEC.initial_state(0))
    good = {"thresholds/fc1": torch.zeros(3), "thresholds/fc2": torch.zeros(2)}
    assert algo.validate_reply(server, Reply(0, good, 1)) is None
    assert "names" in algo.validate_reply(server, Reply(0, {"thresholds/fc1": torch.zeros(3)}, 1))
    assert "shape" in algo.validate_reply(server, Reply(0, {**good, "thresholds/fc2": torch.zeros(3)}, 1))
    assert "dtype" in algo.validate_reply(server, Reply(0, {**good, "thresholds/fc2": torch.zeros(2, dtype=torch.float64)}, 1))
    assert "non-finite" in algo.validate_reply(server, Reply(0, {**good, "thresholds/fc2": torch.tensor([0.0, float("nan")])}, 1))


def test_masked_layer_names_of_the_tiny_model():
    assert [n for n, _ in masked_layers(Tiny())] == ["fc1", "fc2"]


def test_a_down_message_without_the_delta_it_needs_is_refused():
    algo = algorithm()  # before_training + server_sends: delta/* must travel
    client = algo.init_client(0, SPEC.initial_state(0))
    with pytest.raises(ValueError, match="lacks delta"):
        algo.client_update(client, {"thresholds/fc1": torch.zeros(3), "thresholds/fc2": torch.zeros(2)}, tiny_data(), ClientTask(0, 0, 0))


# -- the collapse guard across evaluation and the next round (the reference's order) ---------

def collapsed(algo, kept_fraction):
    """Client 0 with every fc1 unit pruned (threshold 10); its last forward pass saw ``kept_fraction`` of fc1."""
    state = algo.init_client(0, SPEC.initial_state(0))
    weights = dict(state["model"])
    weights["fc1.threshold"] = torch.full((3,), 10.0)
    weights["fc1.kept_fraction"] = torch.tensor(kept_fraction)
    return {**state, "model": weights}


def test_evaluation_resets_a_collapsed_layer_and_the_client_keeps_the_reset():
    algo = algorithm()
    client = collapsed(algo, 0.0)  # training ended with fc1 at 0 %
    result = algo.evaluate(algo.evaluation_state(client, None), tiny_data(), 2)
    assert result.guard_resets == 1  # fc1, at the first batch
    assert result.after["fc1.threshold"].tolist() == [0.0, 0.0, 0.0]
    assert float(result.after["fc1.kept_fraction"]) == 1.0
    assert result.layer_density == {"fc1": 1.0, "fc2": 1.0}
    kept = algo.absorb_evaluation(client, result.after)
    assert kept["model"]["fc1.threshold"].tolist() == [0.0, 0.0, 0.0] and kept["optimizer"] is client["optimizer"]


def test_global_thresholds_received_after_an_evaluation_are_not_reset():
    """Evaluated as the reference evaluates every client each round, a client trains from the thresholds it receives.

    With lr tiny and no penalty the upload is tau_g (to float precision); the
    same client not evaluated in between still has fc1's stale 0 % and its
    guard zeroes the freshly received fc1 thresholds at the first step.
    """
    algo = algorithm(lr=1e-12, th_coeff=0.0)
    data, task = tiny_data(), ClientTask(client_id=0, round_index=3, seed=0)
    tau_fc1, tau_fc2 = [0.01, 0.02, 0.03], [0.01, 0.02]
    client = collapsed(algo, 0.0)
    evaluated = algo.absorb_evaluation(client, algo.evaluate(algo.evaluation_state(client, None), data, 2).after)
    result = algo.client_update(evaluated, down_message(algo, tau_fc1, tau_fc2), data, task)
    assert result.stats["guard_resets"] == 0
    assert result.message["thresholds/fc1"].tolist() == pytest.approx(tau_fc1)
    stale = algo.client_update(client, down_message(algo, tau_fc1, tau_fc2), data, task)
    assert stale.stats["guard_resets"] == 1
    assert stale.message["thresholds/fc1"].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)


def test_a_collapse_seen_by_the_first_evaluation_batch_is_reset_before_the_second():
    """Evaluating in batches, as the reference (batch_size 64), the guard acts between batches."""
    algo = algorithm()
    data = tiny_data()  # 4 test samples
    client = collapsed(algo, 1.0)  # fc1 pruned by its thresholds, but the last forward pass still kept it all
    two = algo.evaluate(algo.evaluation_state(client, None), data, 2)
    assert two.guard_resets == 1 and not two.settled
    assert two.after["fc1.threshold"].tolist() == [0.0, 0.0, 0.0]
    # batch 1 ran with fc1 pruned (all-zero logits: class 0), batch 2 with the reset thresholds
    dense = Tiny()
    dense.load_state_dict({**client["model"], "fc1.threshold": torch.zeros(3)})
    dense.eval()
    with torch.no_grad():
        second = dense(data.preprocess(data.test_x[2:])).argmax(1)
    expected = int((data.test_y[:2] == 0).sum()) + int((second == data.test_y[2:]).sum())
    assert two.correct == expected
    one = algo.evaluate(algo.evaluation_state(client, None), data, 4)  # one batch: no later forward pass to reset
    assert one.guard_resets == 0 and not one.settled and one.correct == int((data.test_y == 0).sum())
    assert one.after["fc1.threshold"].tolist() == [10.0, 10.0, 10.0] and float(one.after["fc1.kept_fraction"]) == 0.0
    assert one.layer_density == {"fc1": 0.0, "fc2": 1.0}
