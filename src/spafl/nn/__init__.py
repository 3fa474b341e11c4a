"""Masked layers with trainable per-unit thresholds, and tools to apply them to any model."""

from spafl.nn.masked import COLLAPSE_FRACTION, MaskedConv2d, MaskedLayer, MaskedLinear
from spafl.nn.sparsify import (
    configure_masking,
    get_thresholds,
    layer_densities,
    masked_layers,
    model_density,
    num_masked_weights,
    num_thresholds,
    set_masking,
    set_ste,
    set_thresholds,
    sparsify,
)
from spafl.nn.ste import STE_NAMES, step, step_derivative

__all__ = [
    "COLLAPSE_FRACTION", "MaskedConv2d", "configure_masking", "MaskedLayer", "MaskedLinear", "STE_NAMES", "get_thresholds",
    "layer_densities", "masked_layers", "model_density", "num_masked_weights", "num_thresholds", "set_masking", "set_ste",
    "set_thresholds", "sparsify", "step", "step_derivative",
]
