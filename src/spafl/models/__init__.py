"""Model zoo of SPEC §8: LeNet-5 (FMNIST), Conv4 (CIFAR-10), ViT (CIFAR-10 ViT), ResNet-18 variant (CIFAR-100).

Every model builds its masked layers directly (:class:`spafl.nn.MaskedConv2d`,
:class:`spafl.nn.MaskedLinear`); which layers are masked and which stay
plain follows SPEC §8.

:data:`MODELS` is the one registry of model names (``Config.model`` takes its
choices from it), with each model's input shape in :data:`INPUT_SHAPES`. The
names and shapes are known without importing torch; a model class is
imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spafl.registry import Registry, lazy_attributes

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the classes are resolved by __getattr__
    from torch import nn

    from spafl.models.conv4 import Conv4
    from spafl.models.lenet5 import LeNet5
    from spafl.models.resnet18 import ResNet18
    from spafl.models.vit import ViT

# name -> (class as "module:attribute", (channels, height, width) of one input sample)
_TABLE: dict[str, tuple[str, tuple[int, int, int]]] = {
    "lenet5": ("spafl.models.lenet5:LeNet5", (1, 28, 28)),
    "conv4": ("spafl.models.conv4:Conv4", (3, 32, 32)),
    "resnet18": ("spafl.models.resnet18:ResNet18", (3, 32, 32)),
    "vit": ("spafl.models.vit:ViT", (3, 32, 32)),
}

#: Model name -> model class.
MODELS: Registry[type[nn.Module]] = Registry({name: target for name, (target, _) in _TABLE.items()})
#: Model name -> ``(channels, height, width)`` of one input sample.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {name: shape for name, (_, shape) in _TABLE.items()}

# public class name -> module that defines it
_LAZY = {target.partition(":")[2]: target.partition(":")[0] for target, _ in _TABLE.values()}


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
    """Build model ``name`` (a key of :data:`MODELS`) with its SPEC §8 architecture, its masked layers
    using estimator ``ste`` and the collapse guard as given (:func:`spafl.nn.configure_masking`).

    Raises ``ValueError`` for an unknown name (listing the known ones) or an
    unknown straight-through estimator.
    """
    from spafl.nn import configure_masking

    model = MODELS[_check_name(name)](num_classes=num_classes, in_channels=in_channels)
    return configure_masking(model, ste=ste, collapse_guard=collapse_guard)


def input_shape_for(name: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one input sample for model ``name``."""
    return INPUT_SHAPES[_check_name(name)]


__all__ = ["INPUT_SHAPES", "MODELS", "Conv4", "LeNet5", "ResNet18", "ViT", "build_model", "input_shape_for"]

__getattr__, __dir__ = lazy_attributes("spafl.models", _LAZY, globals(), __all__)
