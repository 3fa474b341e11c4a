"""Model zoo of SPEC §8: LeNet-5 (FMNIST), Conv4 (CIFAR-10), ViT (CIFAR-10 ViT), ResNet-18 variant (CIFAR-100).

Every model builds its masked layers directly (:class:`spafl.nn.MaskedConv2d`,
:class:`spafl.nn.MaskedLinear`); which layers are masked and which stay
plain follows SPEC §8.
"""

from __future__ import annotations

from torch import nn

from spafl.models.conv4 import Conv4
from spafl.models.lenet5 import LeNet5
from spafl.models.resnet18 import ResNet18
from spafl.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {
    "lenet5": LeNet5,
    "conv4": Conv4,
    "resnet18": ResNet18,
    "vit": ViT,
}

_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "lenet5": (1, 28, 28),
    "conv4": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "vit": (3, 32, 32),
}


def _check_name(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return name


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    ste: str = "identity",
    collapse_guard: bool = True,
) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`) with its SPEC §8 architecture.

    Raises ``ValueError`` for an unknown name (listing the known ones) or an
    unknown straight-through estimator.
    """
    cls = MODELS[_check_name(name)]
    return cls(num_classes=num_classes, in_channels=in_channels, ste=ste, collapse_guard=collapse_guard)


def input_shape_for(name: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one input sample for model ``name``."""
    return _INPUT_SHAPES[_check_name(name)]


__all__ = ["MODELS", "Conv4", "LeNet5", "ResNet18", "ViT", "build_model", "input_shape_for"]
