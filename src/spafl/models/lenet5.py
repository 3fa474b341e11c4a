"""LeNet-5 with masked (thresholded) conv and linear layers — SPEC §8, FMNIST column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spafl.nn import MaskedConv2d, MaskedLinear


class LeNet5(nn.Module):
    """LeNet-5 for 28×28 single-channel images (SPEC §8, **FMNIST** column).

    ``conv(in→20, 5) → ReLU → maxpool 2 → conv(20→50, 5) → ReLU → maxpool 2
    → flatten (800) → fc(800→500) → ReLU → fc(500→num_classes)``.

    All four layers are masked (one trainable threshold per output unit,
    SPEC §2) and have no bias, as in the reference. With ``num_classes=10``
    and ``in_channels=1`` that is 430,500 masked weights and 580 thresholds.
    There is no unmasked parameter.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(in_channels, 20, 5, bias=False)
        self.conv2 = MaskedConv2d(20, 50, 5, bias=False)
        self.fc1 = MaskedLinear(50 * 4 * 4, 500, bias=False)
        self.fc2 = MaskedLinear(500, num_classes, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 → 24 → 12
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 12 → 8 → 4
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
