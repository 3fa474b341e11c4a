"""Compact execution equals the masked dense computation: outputs, every gradient, BN statistics.

Compared in float64, where the only difference (summation order) stays at
1e-14; in float32 BatchNorm's 1/sqrt(eps) on an all-zero channel amplifies
rounding differences of the gradients to about 1e-4 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spafl.models import build_model
from spafl.nn import MaskedConv2d, MaskedLinear, masked_layers
from spafl.fast import enable as set_compact
from spafl.fast.compact import Sliced, flatten, relu

SHAPES = {"lenet5": (10, (1, 28, 28)), "conv4": (10, (3, 32, 32)), "resnet18": (100, (3, 32, 32)), "vit": (10, (3, 32, 32))}


def prune_half(model: nn.Module, prune_last: bool = True) -> nn.Module:
    """Thresholds at each layer's median score (half the units pruned) and random BN parameters and statistics."""
    generator = torch.Generator().manual_seed(3)
    layers = list(masked_layers(model))
    with torch.no_grad():
        for position, (_, layer) in enumerate(layers):
            scores = layer.weight.abs().flatten(1).mean(dim=1)
            if position == len(layers) - 1 and not prune_last:
                layer.threshold.fill_(-1.0)
            else:
                layer.threshold.copy_(scores.median().expand_as(scores))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str):
    """Logits and every parameter gradient after one forward/backward in ``mode`` (eval | train | frozen)."""
    model.train(mode != "eval")
    for _, layer in masked_layers(model):
        layer.threshold.requires_grad_(mode != "frozen")
    if mode == "eval":
        with torch.no_grad():
            return model(x), {}
    logits = model(x)
    penalty = sum(torch.exp(-layer.threshold).sum() for _, layer in masked_layers(model))
    (F.cross_entropy(logits, y) + 0.01 * penalty).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def assert_same(dense: nn.Module, compact: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> None:
    out_dense, grads_dense = step(dense, x, y, mode)
    out_compact, grads_compact = step(compact, x, y, mode)
    scale = float(out_dense.detach().abs().max())
    torch.testing.assert_close(out_compact, out_dense, atol=1e-10 * scale, rtol=1e-9)
    assert set(grads_compact) == set(grads_dense)
    for name, grad in grads_dense.items():
        torch.testing.assert_close(grads_compact[name], grad, atol=1e-10 * float(grad.abs().max()) + 1e-30, rtol=1e-9, msg=name)
    for (name, a), (_, b) in zip(dense.named_buffers(), compact.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=name)


def pair(name: str, ste: str = "identity", prune_last: bool = True) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    num_classes, shape = SHAPES[name]
    torch.manual_seed(1)
    dense = prune_half(build_model(name, num_classes, shape[0], ste=ste).double(), prune_last)
    compact = set_compact(copy.deepcopy(dense))
    x = torch.randn(6, *shape, dtype=torch.float64) * 40
    y = torch.randint(0, num_classes, (6,))
    return dense, compact, x, y


def computed(model: nn.Module) -> dict[str, int]:
    return {name: layer.computed_units for name, layer in masked_layers(model)}


def half(model: nn.Module) -> dict[str, int]:
    return {name: layer.num_units - layer.num_units // 2 for name, layer in masked_layers(model)}


@pytest.mark.parametrize("mode", ["eval", "train", "frozen"])
@pytest.mark.parametrize("ste", ["identity", "outside_unit"])
def test_lenet5_compact_is_exact_and_computes_only_kept_units(mode, ste):
    dense, compact, x, y = pair("lenet5", ste)
    assert_same(dense, compact, x, y, mode)
    # every hidden layer feeds a ReLU: pruned units are dropped even while thresholds train
    expected = half(compact)
    if mode == "train" and ste == "identity":
        expected["fc2"] = 10  # a pruned logit still gets a cross-entropy gradient
    assert computed(compact) == expected


@pytest.mark.parametrize("mode", ["eval", "train", "frozen"])
@pytest.mark.parametrize("ste", ["identity", "outside_unit"])
def test_conv4_compact_is_exact_with_random_batchnorm(mode, ste):
    dense, compact, x, y = pair("conv4", ste)
    assert_same(dense, compact, x, y, mode)
    if mode == "train" and ste == "identity":
        # after BatchNorm a pruned filter outputs beta and gets gradient: every unit is computed
        assert computed(compact) == {name: layer.num_units for name, layer in masked_layers(compact)}
    else:
        # outside_unit: |s - tau| << 1 at every pruned unit, so the estimator passes no gradient there
        assert computed(compact) == half(compact)


@pytest.mark.parametrize("name", ["resnet18", "vit"])
@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_models_without_roles_scatter_kept_units_back(name, mode):
    dense, compact, x, y = pair(name)
    x, y = x[:2], y[:2]
    assert_same(dense, compact, x, y, mode)
    assert computed(compact) == half(compact)


def test_pruned_units_feeding_relu_get_no_loss_gradient_but_logits_and_bn_do():
    """Why compact training is exact for LeNet-5's hidden layers and not for its last layer or after BN."""
    dense, _, x, y = pair("lenet5")
    logits = dense(x)
    F.cross_entropy(logits, y).backward()
    for name, layer in masked_layers(dense):
        pruned = ~layer.kept_units()
        if name == "fc2":
            assert layer.threshold.grad[pruned].abs().min() > 0
        else:
            assert torch.count_nonzero(layer.threshold.grad[pruned]) == 0
            assert torch.count_nonzero(layer.weight.grad[pruned]) == 0
    conv4, _, x, y = pair("conv4")
    F.cross_entropy(conv4.train()(x), y).backward()
    # a pruned filter outputs beta after BN; where ReLU(beta) > 0 its threshold gets gradient
    assert conv4.conv2.threshold.grad[~conv4.conv2.kept_units()].abs().max() > 0


def test_sliced_full_and_flatten_by_hand():
    values = torch.arange(8.0).view(1, 2, 2, 2)  # channels 1 and 3 of 4
    sliced = Sliced(values, torch.tensor([1, 3]), torch.tensor([0, 2]), 4, fill=torch.tensor([-1.0, 7.0]))
    whole = sliced.full()
    assert whole[0, 0].eq(-1).all() and whole[0, 2].eq(7).all()
    assert torch.equal(whole[0, 1], values[0, 0]) and torch.equal(whole[0, 3], values[0, 1])
    flat = flatten(sliced)
    assert flat.index.tolist() == [4, 5, 6, 7, 12, 13, 14, 15] and flat.dropped.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert torch.equal(flat.full(), torch.flatten(whole, 1))


@pytest.mark.parametrize("layer", [
    MaskedLinear(12, 5, bias=True, dtype=torch.float64),
    MaskedConv2d(6, 4, 3, bias=True, dtype=torch.float64),
    MaskedConv2d(6, 4, 3, padding=1, bias=True, dtype=torch.float64),  # constants meet zero padding: computed on the full input
    MaskedConv2d(6, 4, 3, groups=2, bias=True, dtype=torch.float64),  # a subset of filters would regroup inputs: all computed
], ids=["linear", "conv", "conv-padded", "conv-groups"])
def test_layer_with_sliced_input_and_constant_channels_matches_dense(layer):
    """Input channels 0, 2 dropped and holding constants (as after BN); gradients reach the constants too."""
    torch.manual_seed(0)
    with torch.no_grad():
        scores = layer.weight.abs().flatten(1).mean(dim=1)
        layer.threshold.copy_(scores.median().expand_as(scores))
    compact = set_compact(copy.deepcopy(layer))
    compact.compact_role = "relu"
    channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
    full_in = torch.randn(3, channels, 7, 7) if isinstance(layer, MaskedConv2d) else torch.randn(3, channels)
    full_in = full_in.double()
    kept, dropped = torch.tensor([1, 3, 4, 5]), torch.tensor([0, 2])
    if isinstance(layer, MaskedLinear):
        kept, dropped = torch.arange(2, channels), torch.tensor([0, 1])
    outputs, grads = [], []
    for model, sliced in ((layer, False), (compact, True)):
        values = full_in.index_select(1, kept).clone().requires_grad_(True)
        constants = torch.tensor([0.5, -2.0], dtype=torch.float64, requires_grad=True)
        x = Sliced(values, kept, dropped, channels, fill=constants)
        out = relu(model(x if sliced else x.full()))  # the role "relu" promises a ReLU next
        out = out.full() if isinstance(out, Sliced) else out
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([values.grad, constants.grad, model.weight.grad, model.bias.grad, model.threshold.grad])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-12, rtol=1e-10)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    assert compact.computed_units == (4 if getattr(layer, "groups", 1) > 1 else 2)
