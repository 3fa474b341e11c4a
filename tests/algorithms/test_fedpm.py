"""FedPM: frozen signed constants, the straight-through Bernoulli mask, Beta-posterior aggregation, exact bits,
resume and Flower.

The run helpers at the bottom (``quick_config``, ``simulate``, ``recorded_run``, ``assert_resume_is_identical``,
``assert_flower_equals_inprocess``) are shared with the FedSpa tests; the resume and Flower checks themselves are
the FedP3 tests' (``resumed_run_equals_uninterrupted``, ``flower_rows_equal_inprocess``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from spafl.algorithms import ALGORITHMS, ClientTask, FedPM, Reply
from spafl.algorithms.fedpm import MASK_UP, THETA, _SampledMaskNet
from spafl.algorithms.weight_masks import split_masks
from spafl.config import build_config, keys_of
from spafl.metrics import message_bits
from spafl.metrics.bits import coded_message_bits

from .runs import LENET_WEIGHTS, assert_dense_flops, assert_flower_equals_inprocess, assert_resume_is_identical, needs_flower, recorded_run
from .tiny import SPEC, tiny_data



def fedpm(spec=SPEC, **overrides):
    config = build_config("fmnist-quick", overrides={"method": "fedpm", "local_epochs": 1, "batch_size": 4, **overrides})
    return FedPM(config, spec)


def masks_message(fc1, fc2):
    return {MASK_UP + "fc1.weight": torch.tensor(fc1, dtype=torch.bool), MASK_UP + "fc2.weight": torch.tensor(fc2, dtype=torch.bool)}


def test_registered_with_its_keys_and_defaults():
    assert ALGORITHMS["fedpm"] is FedPM and FedPM.reports_coded_bits
    assert keys_of("fedpm") == {"fedpm_optimizer", "fedpm_lr", "fedpm_prior_reset"}
    config = build_config("fmnist-quick", overrides={"method": "fedpm"})
    assert (config.fedpm_optimizer, config.fedpm_lr, config.fedpm_prior_reset) == ("adam", 0.1, 1)


def test_frozen_weights_are_signed_kaiming_constants_from_the_seed():
    algo = fedpm()
    for key, fan_in in (("fc1.weight", 4), ("fc2.weight", 3)):
        weight = algo.frozen_weights[key]
        assert torch.equal(weight.abs(), torch.full(weight.shape, math.sqrt(2 / fan_in)))
    signs = torch.cat([w.flatten() for w in algo.frozen_weights.values()]).sign()
    assert (signs > 0).any() and (signs < 0).any()
    assert all(torch.equal(fedpm().frozen_weights[k], w) for k, w in algo.frozen_weights.items())
    other = fedpm(seed=1).frozen_weights
    assert any(not torch.equal(other[k], w) for k, w in algo.frozen_weights.items())


def test_messages_down_theta_float32_up_one_bool_mask():
    algo = fedpm()
    server = algo.init_server(SPEC.initial_state(0))
    down = algo.server_message(server, 0, 0)
    assert set(down) == {THETA + "fc1.weight", THETA + "fc2.weight"}
    assert all(t.dtype == torch.float32 and bool((t == 0.5).all()) for t in down.values())
    assert message_bits(down) == (12 + 6) * 32
    result = algo.client_update({}, down, tiny_data(), ClientTask(0, 0, 0))
    assert result.state == {}  # stateless clients
    assert {k: (v.dtype, tuple(v.shape)) for k, v in result.message.items()} == {
        MASK_UP + "fc1.weight": (torch.bool, (3, 4)), MASK_UP + "fc2.weight": (torch.bool, (2, 3)),
    }
    assert message_bits(result.message) == 12 + 6
    # dense compute: 3 * E * n * (4*3 + 3*2) MACs, 8 samples, batch 4
    assert result.stats == {"train_loss": pytest.approx(result.stats["train_loss"]), "steps": 2, "flops": 3 * 8 * 18, "num_samples": 8}
    again = algo.client_update({}, down, tiny_data(), ClientTask(0, 0, 0))
    assert all(torch.equal(again.message[k], result.message[k]) for k in result.message)
    assert algo.validate_reply(server, Reply(0, result.message, 8)) is None
    float_mask = {**result.message, MASK_UP + "fc2.weight": torch.ones(2, 3)}
    assert "dtype" in algo.validate_reply(server, Reply(0, float_mask, 8))
    assert "shape" in algo.validate_reply(server, Reply(0, {**result.message, MASK_UP + "fc2.weight": torch.ones(3, 2, dtype=torch.bool)}, 8))
    # no training data: no step, still a valid (untrained) mask
    empty = tiny_data()
    empty.train_x, empty.train_y = empty.train_x[:0], empty.train_y[:0]
    idle = algo.client_update({}, down, empty, ClientTask(1, 0, 0))
    assert idle.stats["steps"] == 0 and math.isnan(idle.stats["train_loss"]) and idle.stats["flops"] == 0
    assert algo.validate_reply(server, Reply(1, idle.message, 0)) is None


def test_score_optimizer_is_adam_at_0_1_by_default_or_sgd_fresh_each_round():
    scores = [torch.nn.Parameter(torch.zeros(3))]
    adam = fedpm()._optimizer(scores)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 0.1
    sgd = fedpm(fedpm_optimizer="sgd", fedpm_lr=0.5, momentum=0.8)._optimizer(scores)
    assert type(sgd) is torch.optim.SGD and (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]) == (0.5, 0.8)
    algo = fedpm(fedpm_optimizer="sgd")
    down = algo.server_message(algo.init_server(SPEC.initial_state(0)), 0, 0)
    assert algo.client_update({}, down, tiny_data(), ClientTask(0, 0, 0)).state == {}  # nothing carried to the next round


def test_the_sampled_mask_is_bernoulli_with_a_straight_through_gradient():
    algo = fedpm()
    model = algo.workspace(algo.frozen_state)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    scores = {"fc1.weight": torch.linspace(-2, 2, 12).view(3, 4), "fc2.weight": torch.linspace(-1, 1, 6).view(2, 3)}
    net = _SampledMaskNet(model, algo.frozen_weights, {k: v.clone() for k, v in scores.items()}, torch.Generator().manual_seed(5))
    x = torch.randn(5, 1, 2, 2)
    labels = torch.tensor([0, 1, 1, 0, 1])
    F.cross_entropy(net(x), labels).backward()
    # the same draws by hand, in the same order
    generator = torch.Generator().manual_seed(5)
    samples = {k: torch.bernoulli(torch.sigmoid(s), generator=generator) for k, s in scores.items()}
    effective = {k: (algo.frozen_weights[k] * samples[k]).requires_grad_() for k in scores}
    hidden = torch.relu(x.flatten(1) @ effective["fc1.weight"].T)
    F.cross_entropy(hidden @ effective["fc2.weight"].T, labels).backward()
    for score, key in zip(net.scores, net.keys):
        theta = torch.sigmoid(scores[key])
        # dL/ds = dL/dm * dm/dtheta (straight-through: 1) * sigmoid'(s), dL/dm = dL/dW~ * W
        expected = effective[key].grad * algo.frozen_weights[key] * theta * (1 - theta)
        torch.testing.assert_close(score.grad, expected)


def test_aggregation_is_the_beta_posterior_mode_with_priors_reset_every_round():
    algo = fedpm()
    server = algo.init_server(SPEC.initial_state(0))
    fc2 = [[True, False, False], [False, False, False]]
    replies = [
        Reply(0, masks_message([[1, 1, 0, 0]] * 3, fc2), 4),
        Reply(1, masks_message([[1, 0, 1, 0]] * 3, fc2), 2),
        Reply(2, masks_message([[1, 0, 0, 0]] * 3, fc2), 9),
        Reply(3, masks_message([[0, 1, 1, 1]] * 3, fc2), 0),  # no training data: left out of the posterior
    ]
    new = algo.aggregate(server, replies, 0)
    # alpha = 1 + ones, beta = 1 + (3 - ones); mode = ones / 3
    assert new["theta"]["fc1.weight"].tolist() == [[1.0, pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0]] * 3
    assert new["alpha"]["fc1.weight"].tolist() == [[4.0, 2.0, 2.0, 1.0]] * 3
    assert new["beta"]["fc1.weight"].tolist() == [[1.0, 3.0, 3.0, 4.0]] * 3
    assert new["theta"]["fc2.weight"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # reset every round: the next round's theta is that round's mean mask alone
    later = algo.aggregate(new, replies[1:2], 1)
    assert later["theta"]["fc1.weight"].tolist() == [[1.0, 0.0, 1.0, 0.0]] * 3
    # no reply (or only replies without data): nothing changes
    assert algo.aggregate(server, [], 0) is server
    idle = algo.aggregate(server, replies[3:], 0)
    assert torch.equal(idle["theta"]["fc1.weight"], server["theta"]["fc1.weight"])


def test_aggregation_accumulates_between_prior_resets():
    algo = fedpm(fedpm_prior_reset=2)
    server = algo.init_server(SPEC.initial_state(0))
    fc2 = [[True] * 3, [False] * 3]
    first = algo.aggregate(server, [Reply(0, masks_message([[1, 1, 0, 0]] * 3, fc2), 1)], 0)  # round 0: reset
    assert first["theta"]["fc1.weight"].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 3
    second = algo.aggregate(first, [Reply(1, masks_message([[1, 0, 1, 0]] * 3, fc2), 1)], 1)  # round 1: accumulate
    # alpha = 1 + (2, 1, 1, 0), beta = 1 + (0, 1, 1, 2): mode = (alpha - 1) / (alpha + beta - 2)
    assert second["theta"]["fc1.weight"].tolist() == [[1.0, 0.5, 0.5, 0.0]] * 3
    third = algo.aggregate(second, [Reply(1, masks_message([[0, 0, 0, 1]] * 3, fc2), 1)], 2)  # round 2: reset again
    assert third["theta"]["fc1.weight"].tolist() == [[0.0, 0.0, 0.0, 1.0]] * 3


def test_evaluation_is_the_global_model_with_theta_above_one_half():
    algo = fedpm()
    server = algo.init_server(SPEC.initial_state(0))
    server["theta"] = {"fc1.weight": torch.tensor([[0.9, 0.5, 0.2, 0.6]] * 3), "fc2.weight": torch.ones(2, 3)}
    weights = algo.evaluation_state({}, server)
    assert algo.evaluation_state({"anything": 1}, server)["fc1.weight"].equal(weights["fc1.weight"])  # not personal
    state, masks = split_masks(weights)
    assert torch.equal(state["fc1.weight"], algo.frozen_weights["fc1.weight"] * torch.tensor([[1.0, 0, 0, 1]] * 3))
    assert torch.equal(state["fc2.weight"], algo.frozen_weights["fc2.weight"])
    evaluation = algo.evaluate(weights, tiny_data(), 100)
    assert evaluation.density == pytest.approx((0.5 + 1.0) / 2) and evaluation.density_weighted == pytest.approx(12 / 18)
    assert evaluation.num_test == 4


# -- runs on synthetic data ------------------------------------------------------------------------
def test_lenet_bits_per_round_are_the_formula(tmp_path, synthetic):
    rows, simulator, uploads = recorded_run(tmp_path, synthetic, "fedpm")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["bits_down"] == 2 * 32 * LENET_WEIGHTS == 27_552_000  # K = 2 clients, theta in float32
        assert row["bits_up"] == 2 * LENET_WEIGHTS == 861_000  # one 1-bit mask per weight
        coded = sum(coded_message_bits(uploads[row["round"] - 1, k][0]) for k in row["sampled"])
        assert row["bits_up_coded"] == coded
        # per mask tensor ceil(H(p) n + log2 n) <= n + ceil(log2 n): at most a few dozen bits above the raw size
        assert 0 < coded <= row["bits_up"] + 2 * sum(math.ceil(math.log2(n)) for n in (500, 25_000, 400_000, 5_000))
    assert rows[-1]["bits_cum"] == 2 * (27_552_000 + 861_000)
    assert_dense_flops(rows, simulator)
    assert 0 < rows[-1]["density"] < 1 and 0 < rows[-1]["density_weighted"] < 1


def test_resume_gives_identical_metrics(tmp_path, synthetic, monkeypatch):
    assert_resume_is_identical(tmp_path, synthetic, "fedpm", monkeypatch)


@needs_flower
def test_flower_strategy_over_local_grid_equals_inprocess(tmp_path):
    assert_flower_equals_inprocess(tmp_path, "fedpm")
