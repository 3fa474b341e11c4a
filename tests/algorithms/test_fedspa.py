"""FedSpa: ERK personal masks, masked local training, prune-and-regrow, the signed sparse aggregation, exact bits,
resume and Flower; and the per-weight mask helpers (spafl.algorithms.weight_masks)."""

import math

import pytest
import torch

from spafl.algorithms import ALGORITHMS, ClientTask, FedSpa, Reply
from spafl.algorithms.fedspa import DENSE, NEW_MASK, UPDATE, VALUES
from spafl.algorithms.weight_masks import (
    erk_densities, gather_kept, kept_count, magnitude_masks, mask_densities, masked_weight_shapes, prune_fraction,
    prune_smallest, regrow_largest, scatter_kept, split_masks,
)
from spafl.config import build_config, keys_of
from spafl.metrics import message_bits
from spafl.models.lenet5 import LeNet5

from .runs import assert_dense_flops, assert_flower_equals_inprocess, assert_resume_is_identical, needs_flower, recorded_run
from .tiny import SPEC, SPEC_WITH_BIAS, tiny_data

LENET_KEPT = {"conv1.weight": 500, "conv2.weight": 12_159, "fc1.weight": 197_591, "fc2.weight": 5_000}


def fedspa(spec=SPEC, **overrides):
    config = build_config("fmnist-quick", overrides={"method": "fedspa", "local_epochs": 1, "batch_size": 4, "lr": 0.1, **overrides})
    return FedSpa(config, spec)


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


# -- the mask helpers -------------------------------------------------------------------------
def test_erk_densities_of_lenet5_keep_the_small_layers_dense_and_the_total_at_d():
    shapes = masked_weight_shapes(LeNet5())
    assert shapes == {"conv1.weight": (20, 1, 5, 5), "conv2.weight": (50, 20, 5, 5), "fc1.weight": (500, 800), "fc2.weight": (10, 500)}
    densities = erk_densities(shapes, 0.5)
    assert densities["conv1.weight"] == densities["fc2.weight"] == 1.0
    # the rest share one scale: d_l proportional to (sum of dims) / (product of dims)
    assert densities["conv2.weight"] / densities["fc1.weight"] == pytest.approx((80 / 25_000) / (1_300 / 400_000))
    kept = {key: kept_count(densities[key], math.prod(shape)) for key, shape in shapes.items()}
    assert kept == LENET_KEPT and sum(kept.values()) == 215_250 == 430_500 // 2
    assert erk_densities(shapes, 1.0) == {key: 1.0 for key in shapes}


def test_prune_and_regrow_move_exact_counts_ties_to_the_lower_index():
    mask = bools([True, True, True, False, False, True])
    weight = torch.tensor([0.5, -0.1, 0.1, 9.0, 0.0, 2.0])
    pruned = prune_smallest(mask, weight, 2)  # |w| 0.1 at 1 and 2 (tie, both go), never a pruned position
    assert pruned.tolist() == [True, False, False, False, False, True]
    assert prune_smallest(mask, weight, 1).tolist() == [True, False, True, False, False, True]  # tie: the lower index
    grown = regrow_largest(pruned, torch.tensor([5.0, 1.0, 3.0, 3.0, 0.5, 9.0]), 2)  # kept positions never count
    assert grown.tolist() == [True, False, True, True, False, True]
    assert prune_fraction({"w": mask}, {"w": weight}, 0.5)["w"].tolist() == [True, False, False, False, False, True]
    assert magnitude_masks({"w": weight}, {"w": 0.5})["w"].tolist() == [True, False, False, True, False, True]


def test_gather_scatter_and_densities():
    weights = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([7.0, 8.0])}
    masks = {"a": bools([[True, False, True], [False, False, True]]), "b": bools([True, True])}
    kept = gather_kept(weights, masks)
    assert kept["a"].tolist() == [0.0, 2.0, 5.0] and kept["b"].tolist() == [7.0, 8.0]
    base = {"a": torch.full((2, 3), -1.0), "b": torch.zeros(2)}
    assert scatter_kept(kept, masks, base)["a"].tolist() == [[0.0, -1.0, 2.0], [-1.0, -1.0, 5.0]]
    assert mask_densities(masks) == (pytest.approx((0.5 + 1.0) / 2), 5 / 8)
    state, split = split_masks({"a": weights["a"], "mask/a": masks["a"]})
    assert set(state) == {"a"} and torch.equal(split["a"], masks["a"])


# -- FedSpa --------------------------------------------------------------------------------------
def test_registered_with_its_keys_and_defaults():
    assert ALGORITHMS["fedspa"] is FedSpa and FedSpa.personal_evaluation
    assert keys_of("fedspa") == {"fedspa_density", "fedspa_prune_rate"}
    config = build_config("fmnist-quick", overrides={"method": "fedspa"})
    assert (config.fedspa_density, config.fedspa_prune_rate) == (0.5, 0.5)


def test_initial_masks_are_personal_erk_and_known_to_server_and_client():
    algo = fedspa(spec=SPEC)
    first, second = algo.initial_masks(0), algo.initial_masks(1)
    assert all(torch.equal(first[k], fedspa(spec=SPEC).initial_masks(0)[k]) for k in first)  # from (seed, client) only
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert {k: int(m.sum()) for k, m in first.items()} == {
        k: kept_count(d, math.prod(algo.mask_shapes[k])) for k, d in algo.layer_density.items()
    }


def test_prune_rate_is_cosine_annealed_to_zero():
    algo = fedspa(rounds=10)
    assert algo.prune_rate(0) == 0.5
    assert algo.prune_rate(5) == pytest.approx(0.25)
    assert algo.prune_rate(10) == pytest.approx(0.0, abs=1e-12)
    assert algo.prune_rate(3) > algo.prune_rate(4)


def test_down_message_carries_the_kept_values_only():
    algo = fedspa()
    server = algo.init_server(SPEC.initial_state(0))
    masks = algo.initial_masks(2)
    down = algo.server_message(server, 2, 0)
    assert set(down) == {VALUES + "fc1.weight", VALUES + "fc2.weight"}
    for key, mask in masks.items():
        assert down[VALUES + key].dtype == torch.float32
        assert torch.equal(down[VALUES + key], server["model"][key][mask])
    assert message_bits(down) == 32 * sum(int(m.sum()) for m in masks.values())
    # biases (or BatchNorm) travel dense
    with_bias = fedspa(spec=SPEC_WITH_BIAS)
    extra = with_bias.server_message(with_bias.init_server(SPEC_WITH_BIAS.initial_state(0)), 2, 0)
    assert {name for name in extra if name.startswith(DENSE)} == {DENSE + "fc1.bias", DENSE + "fc2.bias"}


def test_client_trains_only_kept_weights_and_keeps_its_density():
    algo = fedspa()
    server = algo.init_server(SPEC.initial_state(0))
    client = algo.init_client(2, SPEC.initial_state(0))
    masks = algo.initial_masks(2)
    down = algo.server_message(server, 2, 0)
    result = algo.client_update(client, down, tiny_data(), ClientTask(2, 0, 0))
    start = {k: server["model"][k] * m for k, m in masks.items()}
    new_masks, weights = result.state["masks"], result.state["weights"]
    for key, mask in masks.items():
        update = result.message[UPDATE + key]
        assert update.shape == (int(mask.sum()),) and update.dtype == torch.float32
        assert (update != 0).any()  # the kept weights trained
        assert int(new_masks[key].sum()) == int(mask.sum())  # fixed density
        # the personal model: trained values under the new mask, zero elsewhere; kept-and-kept weights = start + update
        assert not weights[key][~new_masks[key]].any()
        both = (mask & new_masks[key]).reshape(-1)
        trained = start[key].reshape(-1).clone()
        trained[mask.reshape(-1)] += update
        torch.testing.assert_close(weights[key].reshape(-1)[both], trained[both])
    # the mask travels for the layers whose mask changed, and only those
    changed = {k for k in masks if not torch.equal(new_masks[k], masks[k])}
    assert changed and {n[len(NEW_MASK):] for n in result.message if n.startswith(NEW_MASK)} == changed
    assert result.stats["steps"] == 2 and result.stats["flops"] == 3 * 8 * 18  # dense compute
    assert algo.validate_reply(server, Reply(2, result.message, 8)) is None
    # the server now places this client's next values under its new mask
    after = algo.aggregate(server, [Reply(2, result.message, 8)], 0)
    assert all(torch.equal(after["masks"]["2"][k], new_masks[k]) for k in masks)
    assert algo.server_message(after, 2, 1)[VALUES + "fc1.weight"].numel() == int(masks["fc1.weight"].sum())
    # a second training starts from the new mask
    again = algo.client_update(result.state, algo.server_message(after, 2, 1), tiny_data(), ClientTask(2, 1, 0))
    assert algo.validate_reply(after, Reply(2, again.message, 8)) is None


def test_the_server_adds_the_update_sign_checked_on_one_client():
    """One client: the new global weights at its round-start mask are exactly its trained weights."""
    algo = fedspa()
    server = algo.init_server(SPEC.initial_state(0))
    masks = algo.initial_masks(1)
    result = algo.client_update(algo.init_client(1, None), algo.server_message(server, 1, 0), tiny_data(), ClientTask(1, 0, 0))
    after = algo.aggregate(server, [Reply(1, result.message, 8)], 0)
    for key, mask in masks.items():
        expected = server["model"][key][mask] + result.message[UPDATE + key]
        torch.testing.assert_close(after["model"][key][mask], expected)
        assert torch.equal(after["model"][key][~mask], server["model"][key][~mask])  # nobody holds them
        assert not torch.allclose(after["model"][key][mask], server["model"][key][mask])


def test_aggregation_is_the_per_coordinate_mean_of_the_holders_updates():
    algo = fedspa()
    server = algo.init_server(SPEC.initial_state(0))
    server["model"]["fc1.weight"] = torch.arange(12.0).view(3, 4)
    server["model"]["fc2.weight"] = torch.zeros(2, 3)
    # masks by hand (same kept count per layer as the ERK ones would not matter for aggregation)
    server["masks"] = {
        "0": {"fc1.weight": bools([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), "fc2.weight": bools([[1, 0, 0], [0, 0, 0]])},
        "1": {"fc1.weight": bools([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), "fc2.weight": bools([[1, 0, 0], [0, 0, 0]])},
        "2": {"fc1.weight": bools([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]), "fc2.weight": bools([[0, 0, 0], [0, 0, 1]])},
    }
    new_mask = bools([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    replies = [
        Reply(0, {UPDATE + "fc1.weight": torch.tensor([1.0, 2.0]), UPDATE + "fc2.weight": torch.tensor([3.0]),
                  NEW_MASK + "fc1.weight": new_mask}, 5),
        Reply(1, {UPDATE + "fc1.weight": torch.tensor([-4.0, 6.0]), UPDATE + "fc2.weight": torch.tensor([-1.0])}, 1),
        Reply(2, {UPDATE + "fc1.weight": torch.tensor([9.0]), UPDATE + "fc2.weight": torch.tensor([9.0])}, 0),  # no data
    ]
    after = algo.aggregate(server, replies, 0)
    # w[0,0] += 1 (client 0 alone); w[0,1] += (2 - 4) / 2; w[0,2] += 6 (client 1 alone); client 2 has no data: left out
    assert after["model"]["fc1.weight"].tolist() == [[1.0, 0.0, 8.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]]
    assert after["model"]["fc2.weight"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(after["masks"]["0"]["fc1.weight"], new_mask)  # the changed layer is replaced ...
    assert torch.equal(after["masks"]["0"]["fc2.weight"], server["masks"]["0"]["fc2.weight"])  # ... the others kept
    assert torch.equal(server["model"]["fc1.weight"], torch.arange(12.0).view(3, 4))  # the old state is untouched
    assert algo.aggregate(server, [], 0) is server


def test_validate_reply_checks_counts_and_fixed_density():
    algo = fedspa()
    server = algo.init_server(SPEC.initial_state(0))
    masks = algo.initial_masks(0)
    good = {UPDATE + k: torch.zeros(int(m.sum())) for k, m in masks.items()}
    assert algo.validate_reply(server, Reply(0, good, 1)) is None
    assert "shape" in algo.validate_reply(server, Reply(0, {**good, UPDATE + "fc1.weight": torch.zeros(12)}, 1))
    denser = masks["fc1.weight"].clone()
    denser[~denser] = True
    assert "fixed" in algo.validate_reply(server, Reply(0, {**good, NEW_MASK + "fc1.weight": denser}, 1))
    assert "unexpected" in algo.validate_reply(server, Reply(0, {**good, "weights/fc1.weight": torch.zeros(3, 4)}, 1))


def test_evaluation_is_the_clients_own_sparse_model():
    algo = fedspa()
    initial = SPEC.initial_state(0)
    server = algo.init_server(initial)
    untrained = algo.evaluation_state(algo.init_client(3, initial), server)
    state, masks = split_masks(untrained)
    assert all(torch.equal(state[k], initial[k] * masks[k]) and torch.equal(masks[k], algo.initial_masks(3)[k]) for k in masks)
    result = algo.client_update(algo.init_client(3, initial), algo.server_message(server, 3, 0), tiny_data(), ClientTask(3, 0, 0))
    trained = algo.evaluation_state(result.state, {"model": {}, "masks": {}})  # the server's state plays no part
    state, masks = split_masks(trained)
    assert all(torch.equal(state[k], result.state["weights"][k]) for k in masks)
    evaluation = algo.evaluate(trained, tiny_data(), 100)
    assert (evaluation.density, evaluation.density_weighted) == mask_densities(result.state["masks"])


# -- runs on synthetic LeNet-5 ----------------------------------------------------------------------------
def test_lenet_bits_per_round_are_the_formula(tmp_path, synthetic):
    rows, simulator, uploads = recorded_run(tmp_path, synthetic, "fedspa")
    kept = sum(LENET_KEPT.values())
    for row in rows[1:]:
        assert row["bits_down"] == 2 * 32 * kept == 13_776_000  # K = 2, the kept values in float32
        # the kept values' updates, plus conv2's and fc1's masks (25,000 + 400,000 bits), which change while alpha_t > 0
        assert row["bits_up"] == 2 * (32 * kept + 25_000 + 400_000) == 14_626_000
        for k in row["sampled"]:
            assert {n for n in uploads[row["round"] - 1, k][0] if n.startswith(NEW_MASK)} == {"mask/conv2.weight", "mask/fc1.weight"}
    assert "bits_up_coded" not in rows[-1]
    assert all(r["density_weighted"] == 0.5 for r in rows)
    assert rows[-1]["density"] == pytest.approx((1 + 12_159 / 25_000 + 197_591 / 400_000 + 1) / 4)
    assert_dense_flops(rows, simulator)


def test_resume_gives_identical_metrics(tmp_path, synthetic, monkeypatch):
    assert_resume_is_identical(tmp_path, synthetic, "fedspa", monkeypatch)


@needs_flower
def test_flower_strategy_over_local_grid_equals_inprocess(tmp_path):
    assert_flower_equals_inprocess(tmp_path, "fedspa")
