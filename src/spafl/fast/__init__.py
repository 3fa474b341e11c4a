"""Execution speed, behind one switch: the same results as the plain modules, computed faster.

:func:`enable` turns a model into its compact form in place: masked layers
compute only their kept units (:mod:`spafl.fast.layers`, on the kernels of
:mod:`spafl.fast.kernels`), BatchNorm accepts sliced activations
(:mod:`spafl.fast.compact`), the models spafl ships get a forward that
passes those between layers (:mod:`spafl.fast.models`), and the local
training loop takes each step by hand where the model is a chain of masked
layers (:mod:`spafl.fast.step`, :mod:`spafl.fast.chain`). Every one of them
is tested to give the plain computation's values, bit for bit or (for the
reordered kernels) to float rounding.

The layers, models and algorithms never import this package: the engine
switches it on (``execution=fast``, see :func:`spafl.runtime.federation.make_algorithm`),
and the local training loop finds the faster step on the model
(``training_step``, its one seam).
"""

from __future__ import annotations

from torch import nn

from spafl.fast.compact import ROLES, CompactBatchNorm1d, CompactBatchNorm2d
from spafl.fast.layers import CompactConv2d, CompactLayer, CompactLinear
from spafl.fast.models import fast_model
from spafl.fast.step import LocalStep
from spafl.nn.masked import MaskedConv2d, MaskedLinear

#: plain class -> compact class (same parameters, buffers and state-dict keys)
_COMPACT: dict[type, type] = {
    MaskedLinear: CompactLinear,
    MaskedConv2d: CompactConv2d,
    nn.BatchNorm1d: CompactBatchNorm1d,
    nn.BatchNorm2d: CompactBatchNorm2d,
}
_PLAIN = {compact: plain for plain, compact in _COMPACT.items()}
_FAST_CLASSES: dict[type, type] = {}


def _fast_class(cls: type, forward) -> type:
    """A subclass of the model's class whose ``forward`` is the compact one (made once per class)."""
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Compact{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _FAST_CLASSES[cls]


def enable(model: nn.Module) -> nn.Module:
    """Compact execution for ``model``, in place; returns it."""
    entry = fast_model(model)
    roles = dict(entry.roles) if entry is not None else {}
    unknown = {role for role in roles.values() if role not in ROLES}
    if unknown:
        raise ValueError(f"unknown compact roles {sorted(unknown)}; allowed: {', '.join(ROLES)}")
    for name, module in model.named_modules():
        compact = _COMPACT.get(type(module))
        if compact is not None:
            module.__class__ = compact
        if isinstance(module, CompactLayer):
            module.compact_role = roles.get(name)
            module.computed_units = module.num_units
            module._plan = None
    if entry is not None and type(model) not in _FAST_CLASSES.values():
        model.__class__ = _fast_class(type(model), entry.forward)
    model.training_step = LocalStep
    return model


def disable(model: nn.Module) -> nn.Module:
    """The plain modules again (undoes :func:`enable`), in place; returns ``model``."""
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
    for plain, fast in _FAST_CLASSES.items():
        if type(model) is fast:
            model.__class__ = plain
    model.__dict__.pop("training_step", None)
    return model


def is_compact(module: nn.Module) -> bool:
    """Whether ``module`` is a masked layer in compact execution."""
    return isinstance(module, CompactLayer)


__all__ = ["LocalStep", "disable", "enable", "is_compact"]
