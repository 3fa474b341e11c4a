"""A two-layer masked model and a few samples, shared by the algorithm tests."""

import torch
from torch import nn

from spafl.algorithms import ClientData, ModelSpec
from spafl.data import preprocess_for
from spafl.nn import MaskedLinear


class Tiny(nn.Module):
    """fc1 4 -> 3, ReLU, fc2 3 -> 2: five thresholds."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.fc1 = MaskedLinear(4, 3, bias=bias)
        self.fc2 = MaskedLinear(3, 2, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyWithBias(Tiny):
    def __init__(self):
        super().__init__(bias=True)


SPEC = ModelSpec(factory=Tiny, input_shape=(1, 2, 2), num_classes=2)
SPEC_WITH_BIAS = ModelSpec(factory=TinyWithBias, input_shape=(1, 2, 2), num_classes=2)


def tiny_data(n=8, seed=0):
    """``n`` random 2x2 images labelled by whether their mean brightness is above 127."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 2, 2), generator=g, dtype=torch.uint8)
    y = (x.flatten(1).float().mean(1) > 127).long()
    return ClientData(x, y, x[:4], y[:4], preprocess_for("synthetic", "normalized"), 2)
