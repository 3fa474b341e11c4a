"""Conv4 (four 5×5 convs + three linears, with BatchNorm) — SPEC §8, CIFAR-10 column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spafl.nn import MaskedConv2d, MaskedLinear


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
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(in_channels, 64, 5, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = MaskedConv2d(64, 64, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = MaskedConv2d(64, 128, 5, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.conv4 = MaskedConv2d(128, 128, 5, bias=False)
        self.bn4 = nn.BatchNorm2d(128)
        self.fc1 = MaskedLinear(128 * 2 * 2, 128, bias=False)
        self.bn5 = nn.BatchNorm1d(128)
        self.fc2 = MaskedLinear(128, 128, bias=False)
        self.bn6 = nn.BatchNorm1d(128)
        self.fc3 = MaskedLinear(128, num_classes, bias=False)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)
        x = F.relu(self.bn5(self.fc1(torch.flatten(x, 1))))
        x = F.relu(self.bn6(self.fc2(x)))
        return self.fc3(x)
