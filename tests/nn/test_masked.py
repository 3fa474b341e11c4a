"""Masked layers: forward masks and gradients against hand computations (SPEC §2)."""

import pytest
import torch
from torch import nn

from spafl.nn import (
    MaskedConv2d, MaskedLinear, get_thresholds, layer_densities, masked_layers, model_density, num_masked_weights,
    num_thresholds, set_ste, set_thresholds, sparsify, step, step_derivative,
)

# W = [[0.5, -0.3], [0.1, 0.2]], tau = [0.3, 0.2]  ->  s = [0.4, 0.15], s - tau = [0.1, -0.05], m = [1, 0].
# x = [1, 2], L = sum(y): g_ij = x_j, so sum_k g_ik W_ik = [-0.1, 0.5] and n_i = 2.
WEIGHT = [[0.5, -0.3], [0.1, 0.2]]
THRESHOLD = [0.3, 0.2]
X = [1.0, 2.0]

# ste -> (dL/dtau, dL/dW), worked by hand from
#   dL/dtau_i = -step'(s_i - tau_i) * sum_k g_ik W_ik
#   dL/dW_ij  = m_i g_ij + step'(s_i - tau_i) * (sum_k g_ik W_ik) * sign(W_ij) / n_i
EXPECTED = {
    # step' = 1 everywhere
    "identity": ([0.1, -0.5], [[1 - 0.05, 2 + 0.05], [0.25, 0.25]]),
    # |s - tau| < 1 -> step' = 0: only the kept row's direct gradient
    "outside_unit": ([0.0, 0.0], [[1.0, 2.0], [0.0, 0.0]]),
    # step'(0.1) = 2 - 0.4 = 1.6, step'(-0.05) = 2 - 0.2 = 1.8
    "long_tailed": ([0.16, -0.9], [[1 - 0.08, 2 + 0.08], [0.45, 0.45]]),
}


def make_linear(ste, bias=False):
    layer = MaskedLinear(2, 2, bias=bias, ste=ste, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(WEIGHT, dtype=torch.float64))
        layer.threshold.copy_(torch.tensor(THRESHOLD, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("ste", sorted(EXPECTED))
def test_linear_forward_and_gradients_by_hand(ste):
    layer = make_linear(ste)
    y = layer(torch.tensor([X], dtype=torch.float64))
    assert y[0].tolist() == pytest.approx([0.5 * 1 - 0.3 * 2, 0.0])
    y.sum().backward()
    grad_tau, grad_w = EXPECTED[ste]
    assert layer.threshold.grad.tolist() == pytest.approx(grad_tau)
    assert layer.weight.grad.tolist() == [pytest.approx(row) for row in grad_w]


@pytest.mark.parametrize("ste", sorted(EXPECTED))
def test_conv_matches_the_same_hand_computation(ste):
    # A 1x2 kernel over a 1x2 image is the same map as the linear layer above.
    layer = MaskedConv2d(1, 2, kernel_size=(1, 2), ste=ste, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(WEIGHT, dtype=torch.float64).view(2, 1, 1, 2))
        layer.threshold.copy_(torch.tensor(THRESHOLD, dtype=torch.float64))
    y = layer(torch.tensor(X, dtype=torch.float64).view(1, 1, 1, 2))
    assert y.flatten().tolist() == pytest.approx([-0.1, 0.0])
    y.sum().backward()
    grad_tau, grad_w = EXPECTED[ste]
    assert layer.threshold.grad.tolist() == pytest.approx(grad_tau)
    assert layer.weight.grad.view(2, 2).tolist() == [pytest.approx(row) for row in grad_w]


def test_step_derivatives_at_chosen_points():
    x = torch.tensor([-1.5, -1.0, -0.5, -0.4, 0.0, 0.3, 0.4, 0.7, 1.0, 1.2])
    assert step_derivative(x, "identity").tolist() == [1.0] * 10
    assert step_derivative(x, "outside_unit").tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert step_derivative(x, "long_tailed").tolist() == pytest.approx([0, 0.4, 0.4, 0.4, 2.0, 0.8, 0.4, 0.4, 0.4, 0])
    assert step(torch.tensor([-0.1, 0.0, 0.1])).tolist() == [0.0, 0.0, 1.0]  # 0 is pruned: step(0) = 0
    with pytest.raises(ValueError, match="allowed: identity"):
        step(x, "nope")


def test_conv_fan_in_counts_all_incoming_weights():
    layer = MaskedConv2d(3, 2, kernel_size=(2, 2), dtype=torch.float64)
    assert layer.fan_in == 12 and layer.importance_fan_in == 4
    with torch.no_grad():
        layer.weight.fill_(0.5)
    layer(torch.ones(1, 3, 2, 2, dtype=torch.float64)).sum().backward()
    # identity STE, threshold 0, m = 1: dW = g + (sum g*W) sign(W) / 12 = 1 + 12*0.5/12
    assert torch.allclose(layer.weight.grad, torch.full_like(layer.weight, 1.5))
    assert torch.allclose(layer.threshold.grad, torch.full((2,), -6.0, dtype=torch.float64))


def test_pruned_unit_bias_is_masked_and_outputs_zero():
    layer = make_linear("identity", bias=True)
    with torch.no_grad():
        layer.bias.fill_(3.0)
    y = layer(torch.tensor([X], dtype=torch.float64))
    assert y[0].tolist() == pytest.approx([-0.1 + 3.0, 0.0])


def test_collapse_guard_resets_thresholds_on_the_next_forward():
    layer = make_linear("identity")
    with torch.no_grad():
        layer.threshold.fill_(10.0)
    x = torch.tensor([X], dtype=torch.float64)
    assert layer(x).abs().sum() == 0  # everything pruned; kept fraction 0 recorded
    assert float(layer.kept_fraction) == 0.0
    y = layer(x)  # the guard sees the previous 0 % and resets the thresholds
    assert layer.threshold.tolist() == [0.0, 0.0]
    assert y[0].tolist() == pytest.approx([-0.1, 0.5])
    unguarded = make_linear("identity")
    unguarded.collapse_guard = False
    with torch.no_grad():
        unguarded.threshold.fill_(10.0)
    unguarded(x)
    assert unguarded(x).abs().sum() == 0 and unguarded.threshold.tolist() == [10.0, 10.0]


def test_density_layer_mean_and_weighted():
    model = nn.Sequential(MaskedLinear(4, 2), MaskedLinear(2, 8))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(1.0)
        model[0].threshold.copy_(torch.tensor([2.0, 0.0]))  # one of 2 units kept
    densities = layer_densities(model)
    assert densities == {"0": 0.5, "1": 1.0}
    layer_mean, weighted = model_density(model)
    assert layer_mean == pytest.approx(0.75)
    assert weighted == pytest.approx((4 + 16) / (8 + 16))


def test_sparsify_any_model_keeps_its_function_and_honours_exclude():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=True), nn.ReLU(), nn.Flatten(),
        nn.Sequential(nn.Linear(3 * 4 * 4, 5), nn.ReLU()), nn.Linear(5, 2),
    )
    x = torch.randn(2, 1, 4, 4)
    before = model(x)
    sparsify(model, ste="long_tailed", exclude=["4"])
    names = [name for name, _ in masked_layers(model)]
    assert names == ["0", "3.0"]
    assert type(model[4]) is nn.Linear
    assert torch.allclose(model(x), before)
    assert num_thresholds(model) == 3 + 5 and num_masked_weights(model) == 27 + 240
    assert all(layer.ste == "long_tailed" for _, layer in masked_layers(model))
    set_ste(model, "identity")
    assert all(layer.ste == "identity" for _, layer in masked_layers(model))
    predicate = sparsify(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), exclude=lambda name, m: name == "0")
    assert [n for n, _ in masked_layers(predicate)] == ["1"]


def test_threshold_get_set_round_trip_and_name_check():
    model = sparsify(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    values = {"0": torch.tensor([1.0, 2.0, 3.0]), "1": torch.tensor([4.0])}
    set_thresholds(model, values)
    assert {k: v.tolist() for k, v in get_thresholds(model).items()} == {"0": [1.0, 2.0, 3.0], "1": [4.0]}
    with pytest.raises(ValueError, match="missing"):
        set_thresholds(model, {"0": values["0"]})


def test_masking_off_is_a_plain_dense_layer_with_plain_gradients():
    from spafl.nn import set_masking

    layer = make_linear("identity")
    set_masking(nn.Sequential(layer), False)
    y = layer(torch.tensor([X], dtype=torch.float64))
    assert y[0].tolist() == pytest.approx([0.5 - 0.6, 0.1 + 0.4])  # the pruned unit is back
    y.sum().backward()
    assert layer.weight.grad.tolist() == [[1.0, 2.0], [1.0, 2.0]]  # g only: no straight-through term
    assert layer.threshold.grad is None
    assert layer.density() == 1.0
