"""What compact execution knows about the models spafl ships, kept here so that the models carry no execution hints.

For each model class: the role of each masked layer's output (where it goes:
:data:`spafl.fast.compact.ROLES`), a forward that passes :class:`~spafl.fast.compact.Sliced`
activations between layers and fuses ReLU + 2 x 2 max pooling (the same
operators as the model's own ``forward``, so the same values), and, for a
chain of masked layers, its stages for the hand-written training step
(:mod:`spafl.fast.chain`). A model not listed runs its own ``forward``; its
compact layers then compute their kept units and scatter them back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from spafl.fast.compact import flatten, relu, relu_max_pool2d
from spafl.models.conv4 import Conv4
from spafl.models.lenet5 import LeNet5


def _lenet5_forward(self, x):
    x = self.conv1(x, relu_pool=2)  # max_pool2d(relu(conv1(x)), 2): 28 -> 24 -> 12
    x = self.conv2(x, relu_pool=2)  # 12 -> 8 -> 4
    x = relu(self.fc1(flatten(x)))
    return self.fc2(x)


def _conv4_forward(self, x):
    x = relu(self.bn1(self.conv1(x)))
    x = relu_max_pool2d(self.bn2(self.conv2(x)), 2, fused=True)
    x = relu(self.bn3(self.conv3(x)))
    x = relu_max_pool2d(self.bn4(self.conv4(x)), 2, fused=True)
    x = relu(self.bn5(self.fc1(flatten(x))))
    x = relu(self.bn6(self.fc2(x)))
    return self.fc3(x)


@dataclass(frozen=True)
class FastModel:
    """Compact execution's knowledge of one model class."""

    #: masked layer name -> role of its output ("relu": straight into ReLU; "norm": into BatchNorm; "logits")
    roles: dict[str, str]
    #: the compact forward (a function of the module and its input)
    forward: Callable
    #: ``(layer name, stage)`` of the hand-written training step; empty: autograd
    chain: tuple[tuple[str, str], ...] = field(default=())


MODELS: dict[type[nn.Module], FastModel] = {
    # every hidden layer feeds a ReLU directly: pruned units are dropped exactly even while thresholds train
    LeNet5: FastModel(
        roles={"conv1": "relu", "conv2": "relu", "fc1": "relu", "fc2": "logits"},
        forward=_lenet5_forward,
        chain=(("conv1", "relu_pool2"), ("conv2", "relu_pool2"), ("fc1", "relu"), ("fc2", "logits")),
    ),
    # BatchNorm follows every hidden layer: a pruned channel reaches the next layer as the constant ReLU(BN(0))
    Conv4: FastModel(
        roles={"conv1": "norm", "conv2": "norm", "conv3": "norm", "conv4": "norm", "fc1": "norm", "fc2": "norm", "fc3": "logits"},
        forward=_conv4_forward,
    ),
}


def fast_model(model: nn.Module) -> FastModel | None:
    """The entry of ``model``'s class (or of the class it was made from by :func:`spafl.fast.enable`)."""
    for cls in type(model).__mro__:
        if cls in MODELS:
            return MODELS[cls]
    return None


def chain_of(model: nn.Module) -> tuple[tuple[str, str], ...]:
    entry = fast_model(model)
    return entry.chain if entry is not None else ()
