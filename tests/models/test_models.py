"""Model zoo (SPEC §8): parameter counts, shapes, masking behaviour, threshold gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spafl.models import MODELS, Conv4, LeNet5, ResNet18, ViT, build_model, input_shape_for
from spafl.nn import MaskedLayer, configure_masking, masked_layers, model_density, num_masked_weights, num_thresholds

# name -> (num_classes, in_channels, masked weights, thresholds, number of masked layers), SPEC §8
EXPECTED = {
    "lenet5": (10, 1, 430_500, 580, 4),
    "conv4": (10, 3, 804_800, 650, 7),
    "resnet18": (100, 3, 2_790_240, 2_400, 20),
    "vit": (10, 3, 1_966_080, 12_288, 24),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _build(name: str, **kwargs) -> nn.Module:
    num_classes, in_channels, *_ = EXPECTED[name]
    return build_model(name, num_classes, in_channels, **kwargs)


def _batch(name: str, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *input_shape_for(name))


def test_registry():
    assert list(MODELS) == ["lenet5", "conv4", "resnet18", "vit"]
    assert MODELS == {"lenet5": LeNet5, "conv4": Conv4, "resnet18": ResNet18, "vit": ViT}
    assert input_shape_for("lenet5") == (1, 28, 28)
    assert input_shape_for("conv4") == input_shape_for("resnet18") == input_shape_for("vit") == (3, 32, 32)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_match_spec(name):
    _, _, weights, thresholds, layers = EXPECTED[name]
    model = _build(name)
    assert num_masked_weights(model) == weights
    assert num_thresholds(model) == thresholds
    assert len(masked_layers(model)) == layers


@pytest.mark.parametrize("cls", [LeNet5, Conv4, ResNet18, ViT])
def test_docstring_names_spec_column(cls):
    assert "§8" in cls.__doc__


@pytest.mark.parametrize("name", list(EXPECTED))
def test_forward_shape(name):
    num_classes = EXPECTED[name][0]
    model = _build(name)
    out = model(_batch(name))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dense_at_init(name):
    model = _build(name)
    for _, layer in masked_layers(model):
        assert torch.equal(layer.threshold.detach(), torch.zeros(layer.num_units))
    model(_batch(name))
    for _, layer in masked_layers(model):
        assert float(layer.kept_fraction) == 1.0
        assert layer.density() == 1.0
    assert model_density(model) == (1.0, 1.0)


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("ste,guard", [("outside_unit", False), ("long_tailed", True)])
def test_ste_and_guard_reach_every_layer(name, ste, guard):
    model = _build(name, ste=ste, collapse_guard=guard)
    for _, layer in masked_layers(model):
        assert layer.ste == ste
        assert layer.collapse_guard is guard


def test_lenet5_layers():
    model = LeNet5()
    assert [n for n, _ in masked_layers(model)] == ["conv1", "conv2", "fc1", "fc2"]
    assert [tuple(layer.weight.shape) for _, layer in masked_layers(model)] == [
        (20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500),
    ]
    assert all(layer.bias is None for _, layer in masked_layers(model))
    # no parameter outside the masked layers
    assert sum(p.numel() for p in model.parameters()) == 430_500 + 580


def test_conv4_masked_layers_have_no_bias():
    model = Conv4()
    assert all(layer.bias is None for _, layer in masked_layers(model))
    shapes = [tuple(layer.weight.shape) for _, layer in masked_layers(model)]
    assert shapes == [(64, 3, 5, 5), (64, 64, 5, 5), (128, 64, 5, 5), (128, 128, 5, 5), (128, 512), (128, 128), (10, 128)]


def test_resnet18_plain_head_and_shortcuts():
    model = ResNet18(num_classes=100)
    assert type(model.linear) is nn.Linear and not isinstance(model.linear, MaskedLayer)
    assert sum(p.numel() for p in model.linear.parameters()) == 25_700
    assert all(layer.bias is None for _, layer in masked_layers(model))
    shortcuts = [name for name, _ in masked_layers(model) if name.endswith("shortcut")]
    assert shortcuts == ["layer2.0.shortcut", "layer3.0.shortcut", "layer4.0.shortcut"]
    assert model.layer2[0].shortcut.kernel_size == (1, 1) and model.layer2[0].shortcut.stride == (2, 2)
    assert model.layer1[0].shortcut is None and model.layer2[1].shortcut is None


def test_resnet18_shortcut_sees_preactivated_input():
    """The 1×1 shortcut receives relu(bn1(x)), not x (standard pre-act ResNet)."""
    model = ResNet18().eval()
    block = model.layer2[0]
    seen = {}
    block.shortcut.register_forward_pre_hook(lambda m, inp: seen.__setitem__("in", inp[0]))
    x = torch.randn(2, 32, 32, 32)
    block(x)
    assert torch.allclose(seen["in"], F.relu(block.bn1(x)))


def test_vit_masked_and_plain_parts():
    model = ViT()
    names = [n for n, _ in masked_layers(model)]
    per_block = ["attn.to_qkv", "attn.to_out", "mlp.fc1", "mlp.fc2"]
    assert names == [f"blocks.{i}.{suffix}" for i in range(6) for suffix in per_block]
    for module in model.patch_embedding.modules():
        assert not isinstance(module, MaskedLayer)
    assert type(model.patch_embedding.proj) is nn.Linear
    assert type(model.head) is nn.Linear and model.head.out_features == 10
    block = model.blocks[0]
    assert tuple(block.attn.to_qkv.weight.shape) == (1536, 128) and block.attn.to_qkv.bias is None
    assert tuple(block.attn.to_out.weight.shape) == (128, 512) and block.attn.to_out.bias is not None
    assert tuple(block.mlp.fc1.weight.shape) == (256, 128) and block.mlp.fc1.bias is not None
    assert tuple(block.mlp.fc2.weight.shape) == (128, 256) and block.mlp.fc2.bias is not None
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def _capture(layer: nn.Module) -> dict:
    seen = {}
    layer.register_forward_hook(lambda m, inp, out: seen.__setitem__("out", out.detach().clone()))
    return seen


def test_lenet5_huge_threshold_zeroes_conv1_then_guard_resets():
    model = LeNet5()
    seen = _capture(model.conv1)
    x = _batch("lenet5")
    with torch.no_grad():
        model.conv1.threshold.fill_(1e6)
    logits = model(x)
    assert torch.count_nonzero(seen["out"]) == 0
    assert float(model.conv1.kept_fraction) == 0.0
    assert model.conv1.density() == 0.0
    # everything downstream of a dead conv1 is 0 too (no biases anywhere)
    assert torch.count_nonzero(logits) == 0
    layer_mean, weighted = model_density(model)
    assert layer_mean == pytest.approx(0.75)
    assert weighted == pytest.approx((430_500 - 500) / 430_500)
    # collapse guard: the next forward sees kept_fraction 0 <= 1 % and resets the thresholds
    model(x)
    assert torch.count_nonzero(model.conv1.threshold) == 0
    assert torch.count_nonzero(seen["out"]) > 0
    assert float(model.conv1.kept_fraction) == 1.0


def test_lenet5_partial_pruning_zeroes_exactly_those_channels():
    model = configure_masking(LeNet5(), collapse_guard=False)
    seen = _capture(model.conv1)
    pruned = torch.zeros(20, dtype=torch.bool)
    pruned[::2] = True
    with torch.no_grad():
        model.conv1.threshold[pruned] = 1e6
    x = _batch("lenet5")
    model(x)
    model(x)  # no guard: thresholds stay
    out = seen["out"]
    assert torch.count_nonzero(out[:, pruned]) == 0
    assert all(torch.count_nonzero(out[:, c]) > 0 for c in range(20) if not pruned[c])
    assert float(model.conv1.kept_fraction) == 0.5
    assert model_density(model)[0] == pytest.approx((0.5 + 3) / 4)


def test_vit_huge_threshold_zeroes_out_projection_including_bias():
    model = ViT()
    layer = model.blocks[2].attn.to_out
    with torch.no_grad():
        layer.bias.fill_(1.0)
        layer.threshold.fill_(1e6)
    seen = _capture(layer)
    model(_batch("vit"))
    assert torch.count_nonzero(seen["out"]) == 0


def test_lenet5_thresholds_get_gradients_identity_ste():
    model = configure_masking(LeNet5(), ste="identity")
    x = _batch("lenet5", n=8)
    y = torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    for name, layer in masked_layers(model):
        assert layer.threshold.grad is not None, name
        assert torch.count_nonzero(layer.threshold.grad) > 0, name
    # the output layer has no ReLU after it: every one of its 10 thresholds gets a gradient
    assert torch.count_nonzero(model.fc2.threshold.grad) == 10


@pytest.mark.parametrize("name", ["conv4", "resnet18", "vit"])
def test_every_threshold_is_in_the_graph(name):
    model = _build(name, ste="identity")
    F.cross_entropy(model(_batch(name)), torch.tensor([0, 1])).backward()
    for layer_name, layer in masked_layers(model):
        assert layer.threshold.grad is not None, layer_name
        assert torch.count_nonzero(layer.threshold.grad) > 0, layer_name


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="lenet5, conv4, resnet18, vit"):
        build_model("resnet50", 10, 3)
    with pytest.raises(ValueError, match="lenet5"):
        input_shape_for("mlp")


def test_build_model_unknown_ste():
    with pytest.raises(ValueError, match="straight-through"):
        build_model("lenet5", 10, 1, ste="sigmoid")


def test_build_model_passes_classes_and_channels():
    model = build_model("conv4", 7, 1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    model = build_model("vit", 5, 1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
