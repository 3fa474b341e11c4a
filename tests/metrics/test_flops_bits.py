"""FLOPs and bits against hand computations (SPEC §7)."""

import torch
from torch import nn

from spafl.metrics import dense_macs_per_sample, dtype_bits, message_bits, training_flops
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
