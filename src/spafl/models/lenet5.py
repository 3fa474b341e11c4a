"""LeNet-5 with masked (thresholded) conv and linear layers — SPEC §8, FMNIST column."""

from __future__ import annotations

from torch import nn

from spafl.nn import MaskedConv2d, MaskedLinear
from spafl.nn.compact import flatten, relu


class LeNet5(nn.Module):
    """LeNet-5 for 28×28 single-channel images (SPEC §8, **FMNIST** column).

    ``conv(in→20, 5) → ReLU → maxpool 2 → conv(20→50, 5) → ReLU → maxpool 2
    → flatten (800) → fc(800→500) → ReLU → fc(500→num_classes)``.

    All four layers are masked (one trainable threshold per output unit,
    SPEC §2) and have no bias, as in the reference. With ``num_classes=10``
    and ``in_channels=1`` that is 430,500 masked weights and 580 thresholds.
    There is no unmasked parameter.

    Every hidden masked layer feeds a ReLU directly, so compact execution
    (:mod:`spafl.nn.compact`) drops pruned units exactly even while
    thresholds train; the last layer computes all logits.
    """

    compact_roles = {"conv1": "relu", "conv2": "relu", "fc1": "relu", "fc2": "logits"}
    #: ``forward`` as stages, for the hand-written training step (spafl.nn.chain)
    chain = (("conv1", "relu_pool2"), ("conv2", "relu_pool2"), ("fc1", "relu"), ("fc2", "logits"))

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        ste: str = "identity",
        collapse_guard: bool = True,
    ) -> None:
        super().__init__()
        masked = {"ste": ste, "collapse_guard": collapse_guard}
        self.conv1 = MaskedConv2d(in_channels, 20, 5, bias=False, **masked)
        self.conv2 = MaskedConv2d(20, 50, 5, bias=False, **masked)
        self.fc1 = MaskedLinear(50 * 4 * 4, 500, bias=False, **masked)
        self.fc2 = MaskedLinear(500, num_classes, bias=False, **masked)

    def forward(self, x):
        x = self.conv1(x, relu_pool=2)  # max_pool2d(relu(conv1(x)), 2): 28 → 24 → 12
        x = self.conv2(x, relu_pool=2)  # 12 → 8 → 4
        x = relu(self.fc1(flatten(x)))
        return self.fc2(x)
