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


def test_resnet18_masked_counts_and_total_parameters_by_hand():
    """Reference ResNet18 of main/cifar100: stem 3->32, stages 32/64/128/256 (strides 1/2/2/2), two blocks each."""
    convs = [(32, 3, 3)]  # (out, in, kernel) of every masked conv, in order
    batch_norm_channels = [32]  # the stem's
    in_planes = 32
    for planes in (32, 64, 128, 256):
        for index in range(2):
            block_in = in_planes if index == 0 else planes
            convs += [(planes, block_in, 3), (planes, planes, 3)]
            if block_in != planes:
                convs.append((planes, block_in, 1))  # 1x1 shortcut
            batch_norm_channels += [block_in, planes]
        in_planes = planes
    weights = sum(out * fan_in * k * k for out, fan_in, k in convs)
    thresholds = sum(out for out, _, _ in convs)
    assert (len(convs), weights, thresholds) == (20, 2_790_240, 2_400)
    assert (len(batch_norm_channels), sum(batch_norm_channels)) == (17, 1_728)
    head = 256 * 100 + 100
    total = weights + thresholds + 2 * sum(batch_norm_channels) + head
    assert total == 2_821_796
    model = ResNet18(num_classes=100)
    assert (num_masked_weights(model), num_thresholds(model)) == (weights, thresholds)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == 1_728


def test_resnet18_pools_the_last_block_sum_without_batchnorm_relu():
    """As the reference: layer4's output (a bare residual sum, negative values included) goes to the 4x4 pool as is."""
    model = ResNet18().eval()
    assert not hasattr(model, "bn_final")
    assert [name for name, _ in model.named_children()] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"]
    seen = _capture(model.layer4)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    features = seen["out"]
    assert features.shape == (2, 256, 4, 4) and (features < 0).any()
    pooled = features.mean(dim=(2, 3))
    assert torch.allclose(logits, model.linear(pooled), atol=1e-5)


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
    # the reference's patch embedding is the cut and one linear with bias: no LayerNorm before or after
    assert [type(m) for m in model.patch_embedding.children()] == [nn.Linear]
    assert tuple(model.patch_embedding.proj.weight.shape) == (128, 48) and model.patch_embedding.proj.bias is not None
    assert type(model.head) is nn.Linear and model.head.out_features == 10
    block = model.blocks[0]
    # the reference's masked linear has no bias at all: qkv, out-projection and both MLP linears
    assert tuple(block.attn.to_qkv.weight.shape) == (1536, 128) and block.attn.to_qkv.bias is None
    assert tuple(block.attn.to_out.weight.shape) == (128, 512) and block.attn.to_out.bias is None
    assert tuple(block.mlp.fc1.weight.shape) == (256, 128) and block.mlp.fc1.bias is None
    assert tuple(block.mlp.fc2.weight.shape) == (128, 256) and block.mlp.fc2.bias is None
    assert all(layer.bias is None for _, layer in masked_layers(model))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_vit_masked_counts_and_total_parameters_by_hand():
    """Reference masked_vit(image 32, patch 4, dim 128, depth 6, heads 8, dim_head 64, mlp 256), 10 classes."""
    dim, depth, inner, mlp, tokens = 128, 6, 8 * 64, 256, (32 // 4) ** 2 + 1
    masked_shapes = [(3 * inner, dim), (dim, inner), (mlp, dim), (dim, mlp)]  # qkv, out-projection, fc1, fc2
    weights = depth * sum(out * fan_in for out, fan_in in masked_shapes)
    thresholds = depth * sum(out for out, _ in masked_shapes)
    assert (weights, thresholds) == (1_966_080, 12_288)
    patch_embedding = 3 * 4 * 4 * dim + dim  # 6,272
    token_parameters = tokens * dim + dim  # positional embedding 65 x 128, class token 128
    layer_norms = (2 * depth + 1) * 2 * dim  # two per block and the head's, weight and bias each
    head = dim * 10 + 10
    total = weights + thresholds + patch_embedding + token_parameters + layer_norms + head
    assert total == 1_997_706
    model = ViT()
    assert (num_masked_weights(model), num_thresholds(model)) == (weights, thresholds)
    assert sum(p.numel() for p in model.parameters()) == total
    assert tuple(model.pos_embedding.shape) == (1, tokens, dim) and tuple(model.cls_token.shape) == (1, 1, dim)


def test_vit_tokens_start_as_standard_normal_draws():
    """The reference draws the class token and positional embedding with torch.randn (std 1), not std 0.02."""
    torch.manual_seed(3)
    model = ViT()
    values = torch.cat([model.pos_embedding.detach().flatten(), model.cls_token.detach().flatten()])
    assert values.numel() == 65 * 128 + 128
    # over 8,448 N(0, 1) draws the sample std lies within 0.97..1.03 (about 4 standard errors)
    assert 0.97 < float(values.std()) < 1.03
    assert abs(float(values.mean())) < 0.05
    # the reference's draw order from the same seed: the patch linear, then the positions, then the class token
    torch.manual_seed(3)
    reference_patch = nn.Linear(48, 128)
    assert torch.equal(reference_patch.weight, model.patch_embedding.proj.weight)
    assert torch.equal(torch.randn(1, 65, 128), model.pos_embedding.detach())
    assert torch.equal(torch.randn(1, 1, 128), model.cls_token.detach())


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


def test_vit_huge_threshold_zeroes_out_projection():
    model = ViT()
    layer = model.blocks[2].attn.to_out
    with torch.no_grad():
        layer.threshold.fill_(1e6)
    seen = _capture(layer)
    model(_batch("vit"))
    assert seen["out"].shape == (2, 65, 128)
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
