"""Turn any model's Linear/Conv2d layers into masked layers, and read its sparsity."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch
from torch import nn

from spafl.nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from spafl.nn.ste import STE_NAMES

Exclude = Iterable[str] | Callable[[str, nn.Module], bool] | None


def _is_excluded(name: str, module: nn.Module, exclude: Exclude) -> bool:
    if exclude is None:
        return False
    if callable(exclude):
        return bool(exclude(name, module))
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def _masked_copy(module: nn.Module, ste: str, collapse_guard: bool) -> MaskedLayer:
    has_bias = module.bias is not None
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        layer: MaskedLayer = MaskedLinear(
            module.in_features, module.out_features, bias=has_bias, ste=ste, collapse_guard=collapse_guard, **factory
        )
    else:
        if module.padding_mode != "zeros":
            raise ValueError(f"cannot sparsify a Conv2d with padding_mode={module.padding_mode!r}; only 'zeros'")
        layer = MaskedConv2d(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=has_bias,
            ste=ste, collapse_guard=collapse_guard, **factory,
        )
    with torch.no_grad():
        layer.weight.copy_(module.weight)
        if has_bias:
            layer.bias.copy_(module.bias)
    layer.train(module.training)
    return layer


def sparsify(model: nn.Module, ste: str = "identity", exclude: Exclude = None, collapse_guard: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by its masked twin, in place.

    Weights and biases are copied; thresholds start at 0, so the model's
    function is unchanged (all units kept) until thresholds are trained.

    ``exclude`` keeps layers dense: either glob patterns over qualified module
    names (``["head", "blocks.*.attn.to_qkv"]``) or a predicate
    ``(name, module) -> bool``. Layers that are already masked are left alone.
    Returns ``model`` for chaining.
    """
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue  # subclasses (e.g. NonDynamicallyQuantizableLinear inside attention) keep their own forward
        if _is_excluded(name, module, exclude):
            continue
        replacements.append(name)
    for name in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _masked_copy(getattr(parent, child), ste, collapse_guard))
    return model


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """All masked layers of ``model`` with their qualified names, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MaskedLayer)]


def set_ste(model: nn.Module, ste: str) -> None:
    """Use straight-through estimator ``ste`` in every masked layer."""
    if ste not in STE_NAMES:
        raise ValueError(f"unknown straight-through estimator {ste!r}; allowed: {', '.join(STE_NAMES)}")
    for _, layer in masked_layers(model):
        layer.ste = ste


def configure_masking(model: nn.Module, ste: str = "identity", collapse_guard: bool = True) -> nn.Module:
    """SpaFL's options for every masked layer of ``model``: its straight-through estimator and the collapse guard; returns ``model``."""
    set_ste(model, ste)
    for _, layer in masked_layers(model):
        layer.collapse_guard = collapse_guard
    return model


def set_masking(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn unit masking on or off in every masked layer (off: a plain dense model)."""
    for _, layer in masked_layers(model):
        layer.masking = enabled
    return model


def get_thresholds(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer name>": thresholds}`` (detached clones) for every masked layer."""
    return {name: layer.threshold.detach().clone() for name, layer in masked_layers(model)}


@torch.no_grad()
def set_thresholds(model: nn.Module, thresholds: dict[str, torch.Tensor]) -> None:
    """Copy ``thresholds`` (as returned by :func:`get_thresholds`) into the model."""
    layers = dict(masked_layers(model))
    if set(layers) != set(thresholds):
        missing = sorted(set(layers) - set(thresholds))
        extra = sorted(set(thresholds) - set(layers))
        raise ValueError(f"threshold names do not match the model's masked layers (missing {missing}, unexpected {extra})")
    for name, values in thresholds.items():
        layers[name].threshold.copy_(values)


def num_thresholds(model: nn.Module) -> int:
    return sum(layer.num_units for _, layer in masked_layers(model))


def num_masked_weights(model: nn.Module) -> int:
    return sum(layer.weight.numel() for _, layer in masked_layers(model))


def layer_densities(model: nn.Module) -> dict[str, float]:
    """Kept weights / all weights, per masked layer."""
    return {name: layer.density() for name, layer in masked_layers(model)}


def model_density(model: nn.Module) -> tuple[float, float]:
    """``(layer_mean, weighted)`` density over the masked layers.

    ``layer_mean`` is the unweighted mean of layer densities, which is what
    the reference reports; ``weighted`` is kept masked weights / all masked
    weights. Unmasked layers (a ViT's patch embedding, ResNet's head) are
    not counted in either.
    """
    layers = masked_layers(model)
    if not layers:
        return 1.0, 1.0
    kept = 0
    total = 0
    densities = []
    for _, layer in layers:
        units = layer.kept_units()
        densities.append(float(units.float().mean()))
        kept += int(units.sum()) * layer.fan_in
        total += layer.weight.numel()
    return sum(densities) / len(densities), kept / total
