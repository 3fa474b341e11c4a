"""FLOPs and bits against hand computations (SPEC §7)."""

import pytest
import torch
from torch import nn

from spafl.metrics import dense_macs_per_sample, dtype_bits, message_bits, training_flops
from spafl.models import build_model, input_shape_for
from spafl.nn import MaskedConv2d, MaskedLinear


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = MaskedConv2d(1, 2, kernel_size=3)  # 1x4x4 -> 2x2x2
        self.fc = MaskedLinear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_dense_macs_per_sample_by_hand():
    macs = dense_macs_per_sample(TinyConvNet(), (1, 4, 4))
    # conv: out * in * kh * kw * H_out * W_out = 2 * 1 * 9 * 2 * 2; linear: in * out = 8 * 3
    assert macs == {"conv": 72, "fc": 24}


def test_dense_macs_does_not_touch_thresholds_or_kept_fraction():
    model = TinyConvNet()
    with torch.no_grad():
        model.conv.threshold.fill_(100.0)
        model.conv.kept_fraction.zero_()  # would trigger the collapse guard in a normal forward
    dense_macs_per_sample(model, (1, 4, 4))
    assert model.conv.threshold.tolist() == [100.0, 100.0] and float(model.conv.kept_fraction) == 0.0


def test_training_flops_by_hand():
    # E=2, |D|=10, density conv 0.5, fc 1.0: forward = 2*10*(0.5*72 + 24) = 1200
    # backward 2400; thresholds (2+3) * batches 6 + weights (18+24) = 72
    flops = training_flops({"conv": 72, "fc": 24}, {"conv": 0.5, "fc": 1.0}, num_samples=10, local_epochs=2,
                           num_batches=6, num_thresholds=5, num_masked_weights=42)
    assert flops == 1200 + 2400 + 30 + 42


def test_message_bits_count_numel_times_dtype_width():
    assert dtype_bits(torch.float32) == 32 and dtype_bits(torch.float16) == 16 and dtype_bits(torch.uint8) == 8
    message = {"a": torch.zeros(580), "b": torch.zeros(3, 4, dtype=torch.float64), "c": torch.zeros(7, dtype=torch.uint8)}
    assert message_bits(message) == 580 * 32 + 12 * 64 + 7 * 8
    assert message_bits({}) == 0 and message_bits(None) == 0


class TokenMLP(nn.Module):
    """A masked linear applied at 5 positions of one sample, then one applied once (after pooling)."""

    def __init__(self):
        super().__init__()
        self.per_token = MaskedLinear(4, 6)
        self.pooled = MaskedLinear(6, 2)

    def forward(self, x):  # x: [B, 20] seen as 5 tokens of 4 features
        return self.pooled(self.per_token(x.view(-1, 5, 4)).mean(dim=1))


def test_paper_count_takes_a_linear_once_the_true_count_once_per_position():
    paper = dense_macs_per_sample(TokenMLP(), (20,))
    true = dense_macs_per_sample(TokenMLP(), (20,), count="true")
    assert paper == {"per_token": 4 * 6, "pooled": 6 * 2}
    assert true == {"per_token": 5 * 4 * 6, "pooled": 6 * 2}
    assert dense_macs_per_sample(TinyConvNet(), (1, 4, 4), count="true") == {"conv": 72, "fc": 24}
    with pytest.raises(ValueError, match="count must be one of paper, true; got 'exact'"):
        dense_macs_per_sample(TinyConvNet(), (1, 4, 4), count="exact")


def test_vit_paper_count_is_the_reference_formula_and_the_true_count_65_times_it():
    """The reference (FLOP_count_weight, main/cifar10) counts a masked linear as in * out per sample; a 32x32 image
    with 4x4 patches has 64 patch tokens and the class token: 65 positions per masked linear."""
    model = build_model("vit", 10, 3)
    paper = dense_macs_per_sample(model, (3, 32, 32))
    true = dense_macs_per_sample(model, (3, 32, 32), count="true")
    per_block = {"attn.to_qkv": 128 * 1536, "attn.to_out": 512 * 128, "mlp.fc1": 128 * 256, "mlp.fc2": 256 * 128}
    assert paper == {f"blocks.{i}.{name}": macs for i in range(6) for name, macs in per_block.items()}
    assert true == {name: 65 * macs for name, macs in paper.items()}
    assert sum(paper.values()) == 1_966_080 and sum(true.values()) == 127_795_200
    # one client, one epoch over 100 samples at density 1: the forward+backward terms differ by exactly 65x
    args = dict(num_samples=100, local_epochs=1, num_batches=7, num_thresholds=12_288, num_masked_weights=1_966_080)
    full = {name: 1.0 for name in paper}
    threshold_term = 12_288 * 7 + 1_966_080
    assert training_flops(paper, full, **args) == 3 * 100 * 1_966_080 + threshold_term
    assert training_flops(true, full, **args) - threshold_term == 65 * (training_flops(paper, full, **args) - threshold_term)


@pytest.mark.parametrize("name,classes,channels,expected", [
    # LeNet-5 on 28x28: conv 20*1*25*24*24, conv 50*20*25*8*8, fc 800*500, fc 500*10
    ("lenet5", 10, 1, {"conv1": 288_000, "conv2": 1_600_000, "fc1": 400_000, "fc2": 5_000}),
    # Conv4 on 32x32: convs at 28x28, 24x24, 8x8, 4x4; fcs 512*128, 128*128, 128*10
    ("conv4", 10, 3, {"conv1": 3_763_200, "conv2": 58_982_400, "conv3": 13_107_200, "conv4": 6_553_600,
                      "fc1": 65_536, "fc2": 16_384, "fc3": 1_280}),
])
def test_models_without_token_linears_count_the_same_both_ways(name, classes, channels, expected):
    model = build_model(name, classes, channels)
    shape = input_shape_for(name)
    assert dense_macs_per_sample(model, shape) == dense_macs_per_sample(model, shape, count="true") == expected


def test_resnet18_counts_by_hand_and_the_same_both_ways():
    """Convs count every output position in both counts: 32x32 in stage 1, then 16x16, 8x8, 4x4."""
    model = build_model("resnet18", 100, 3)
    paper = dense_macs_per_sample(model, (3, 32, 32))
    assert paper == dense_macs_per_sample(model, (3, 32, 32), count="true")
    assert paper["conv1"] == 32 * 3 * 9 * 32 * 32
    assert paper["layer2.0.conv1"] == 64 * 32 * 9 * 16 * 16 and paper["layer2.0.shortcut"] == 64 * 32 * 16 * 16

    def stage(planes: int, side: int) -> int:
        """conv1 from planes/2 channels, three planes->planes 3x3 convs, the 1x1 shortcut; at side x side."""
        return (planes // 2 * 9 + 3 * planes * 9 + planes // 2) * planes * side * side

    stage1 = 4 * 32 * 32 * 9 * 32 * 32  # four 32->32 3x3 convs at 32x32
    assert sum(paper.values()) == 32 * 3 * 9 * 1024 + stage1 + stage(64, 16) + stage(128, 8) + stage(256, 4) == 139_296_768
