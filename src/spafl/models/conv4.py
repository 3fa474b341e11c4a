"""Conv4 (four 5×5 convs + three linears, with BatchNorm) — SPEC §8, CIFAR-10 column."""

from __future__ import annotations

from torch import nn

from spafl.nn import MaskedConv2d, MaskedLinear
from spafl.nn.compact import CompactBatchNorm1d, CompactBatchNorm2d, flatten, relu, relu_max_pool2d


class Conv4(nn.Module):
    """Four-conv CNN for 32×32 images (SPEC §8, **CIFAR-10** column).

    Feature extractor (5×5 kernels, no padding, every conv followed by
    BatchNorm2d and ReLU)::

        conv 3→64   32→28
        conv 64→64  28→24, maxpool 2 → 12
        conv 64→128 12→8
        conv 128→128 8→4,  maxpool 2 → 2

    then flatten (128·2·2 = 512) → fc 512→128 → BN1d → ReLU → fc 128→128 →
    BN1d → ReLU → fc 128→num_classes.

    All seven conv/linear layers are masked and bias-free; the BatchNorm
    layers are plain (their affine parameters are ordinary dense weights).
    Because BN follows every masked layer but the last, a pruned unit outputs
    the BN shift β rather than 0 (SPEC §2). With ``num_classes=10`` that is
    804,800 masked weights and 650 thresholds.

    Compact execution (:mod:`spafl.nn.compact`) drops pruned units in
    evaluation, while thresholds are frozen, and while the estimator's
    derivative is 0 at every pruned unit; a pruned channel then reaches the
    next layer as the constant ReLU(BN(0)). With ``ste=identity`` and
    thresholds training, every unit is computed (dropping would not be exact).
    """

    compact_roles = {
        "conv1": "norm", "conv2": "norm", "conv3": "norm", "conv4": "norm", "fc1": "norm", "fc2": "norm", "fc3": "logits",
    }

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        ste: str = "identity",
        collapse_guard: bool = True,
    ) -> None:
        super().__init__()
        masked = {"ste": ste, "collapse_guard": collapse_guard}
        self.conv1 = MaskedConv2d(in_channels, 64, 5, bias=False, **masked)
        self.bn1 = CompactBatchNorm2d(64)
        self.conv2 = MaskedConv2d(64, 64, 5, bias=False, **masked)
        self.bn2 = CompactBatchNorm2d(64)
        self.conv3 = MaskedConv2d(64, 128, 5, bias=False, **masked)
        self.bn3 = CompactBatchNorm2d(128)
        self.conv4 = MaskedConv2d(128, 128, 5, bias=False, **masked)
        self.bn4 = CompactBatchNorm2d(128)
        self.fc1 = MaskedLinear(128 * 2 * 2, 128, bias=False, **masked)
        self.bn5 = CompactBatchNorm1d(128)
        self.fc2 = MaskedLinear(128, 128, bias=False, **masked)
        self.bn6 = CompactBatchNorm1d(128)
        self.fc3 = MaskedLinear(128, num_classes, bias=False, **masked)

    def forward(self, x):
        fused = self.conv1.compact  # compact execution: a faster, bit-identical max_pool2d(relu(.), 2)
        x = relu(self.bn1(self.conv1(x)))
        x = relu_max_pool2d(self.bn2(self.conv2(x)), 2, fused)
        x = relu(self.bn3(self.conv3(x)))
        x = relu_max_pool2d(self.bn4(self.conv4(x)), 2, fused)
        x = relu(self.bn5(self.fc1(flatten(x))))
        x = relu(self.bn6(self.fc2(x)))
        return self.fc3(x)
