"""Narrow pre-activation ResNet-18 with masked convolutions — SPEC §8, CIFAR-100 column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spafl.nn import MaskedConv2d


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``BN → ReLU → conv3×3(stride) → BN → ReLU → conv3×3``.

    Shortcut: identity when the shape is unchanged; otherwise a masked 1×1
    conv (given stride, no bias) applied to the *pre-activated* input
    ``relu(bn1(x))``, as in the standard pre-activation ResNet (He et al.,
    "Identity Mappings in Deep Residual Networks", 2016). The identity
    shortcut carries the raw input ``x``. There is no activation after the
    addition.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = MaskedConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = MaskedConv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: MaskedConv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = MaskedConv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class ResNet18(nn.Module):
    """ResNet-18 variant for 32×32 images (SPEC §8, **CIFAR-100** column).

    * stem: masked conv3×3 ``in_channels→32`` (padding 1, no bias) → BN → ReLU;
    * four stages of two :class:`PreActBlock` each, widths 32/64/128/256,
      strides 1/2/2/2 (spatial 32→32→16→8→4); the first block of stages 2–4
      has a masked 1×1 shortcut conv;
    * 4×4 average pool of the last block's output, taken as it is: the bare
      sum of its residual addition, with no BN → ReLU before the pool (the
      reference's ``ResNet18`` in ``main/cifar100/model/net.py`` has none,
      unlike the standard pre-activation ResNet);
    * flatten (256) → plain ``nn.Linear(256, num_classes)`` with bias (not
      masked, not counted in density).

    All 20 convolutions (stem, 16 block convs, 3 shortcuts) are masked and
    bias-free: 2,790,240 masked weights and 2,400 thresholds, plus 25,700
    parameters in the plain head for ``num_classes=100`` and 3,456 in the 17
    BatchNorms (1,728 channels): 2,821,796 parameters in all, thresholds
    included.
    """

    widths = (32, 64, 128, 256)
    strides = (1, 2, 2, 2)
    blocks_per_stage = 2

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(in_channels, self.widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        in_planes = self.widths[0]
        stages = []
        for planes, stride in zip(self.widths, self.strides):
            blocks = []
            for index in range(self.blocks_per_stage):
                blocks.append(PreActBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.avg_pool2d(x, 4)
        return self.linear(torch.flatten(x, 1))
