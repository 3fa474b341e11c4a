"""A training step's loss and gradients without autograd, for a model that is a chain of masked layers.

Autograd records every operator of the forward pass and then walks the
recorded graph. On a small CPU that bookkeeping is a large share of a
LeNet-5-sized step: about 300 operators, each costing 10-15 µs while
recorded against 4-7 µs plain. For a model whose forward is a plain chain,
:mod:`spafl.fast.models` records the chain, a tuple of ``(layer name, stage)``:

``"relu_pool2"``
    a :class:`~spafl.nn.MaskedConv2d` (stride 1, no bias) followed by ReLU
    and 2 x 2 max pooling (``layer(x, relu_pool=2)``);
``"relu"``
    a :class:`~spafl.nn.MaskedLinear` (no bias) followed by ReLU; its input
    is flattened first (``relu(layer(flatten(x)))``);
``"logits"``
    the last stage: a :class:`~spafl.nn.MaskedLinear` whose output is the
    logits, followed by the mean cross-entropy loss.

Under compact execution, :func:`chain_gradients` then runs the same
operators that ``cross_entropy(model(x), y).backward()`` runs, in the same
order, with the derivatives autograd would apply written out. Loss and
gradients are bit-identical (tests/nn/test_chain.py checks every weight and
threshold, every estimator, frozen thresholds, and layers with no or all
units kept). :func:`chain_stages` says when it applies; where it does not
(no ``chain``, compact execution off, a frozen weight, a bias), train with
autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spafl.fast.compact import Sliced, flatten
from spafl.fast.kernels import (
    conv2d_backward,
    conv2d_forward,
    conv_relu_pool2x2_backward,
    conv_relu_pool2x2_forward,
    relu_max_pool2x2_backward,
    relu_max_pool2x2_forward,
)
from spafl.fast.layers import CompactConv2d, CompactLayer, CompactLinear, CompactUnits, compact_units, compact_units_backward

#: The stages a ``chain`` may name.
STAGES = ("relu_pool2", "relu", "logits")

#: ``reduction`` and ``ignore_index`` of ``F.cross_entropy``'s defaults, as ``aten.nll_loss_*`` take them.
_MEAN, _IGNORE = 1, -100


def chain_stages(model: torch.nn.Module) -> list[tuple[CompactLayer, str]] | None:
    """The model's chain as ``(layer, stage)`` pairs when :func:`chain_gradients` applies to it; else None.

    It applies when the model declares a ``chain`` and every layer in it is
    masked, in compact execution, without bias, with a trainable weight, and
    of the kind its stage needs. A ``chain`` naming an unknown stage is an error.
    """
    from spafl.fast.models import chain_of

    chain = chain_of(model)
    if not chain:
        return None
    unknown = {stage for _, stage in chain if stage not in STAGES}
    if unknown:
        raise ValueError(f"chain has unknown stages {sorted(unknown)}; allowed: {', '.join(STAGES)}")
    stages = [(model.get_submodule(name), stage) for name, stage in chain]
    last = len(stages) - 1
    if all(_applies(layer, stage, position == last) for position, (layer, stage) in enumerate(stages)):
        return stages
    return None


def _applies(layer, stage: str, last: bool) -> bool:
    if not isinstance(layer, CompactLayer) or not layer.masking:
        return False
    if layer.bias is not None or not layer.weight.requires_grad or (stage == "logits") != last:
        return False
    if stage == "relu_pool2":
        return (
            isinstance(layer, CompactConv2d) and layer.compact_role == "relu" and layer.groups == 1
            and layer.stride == (1, 1) and layer.dilation == (1, 1) and not isinstance(layer.padding, str)
        )
    return isinstance(layer, CompactLinear) and layer.compact_role == ("relu" if stage == "relu" else "logits")


@dataclass
class _Step:
    """What one stage's backward needs from its forward."""

    layer: CompactLayer
    stage: str
    units: CompactUnits
    weight: torch.Tensor  # the computed units' weights (W[rows], or W * m)
    used: torch.Tensor  # ``weight``'s columns of the input's computed channels
    index: torch.Tensor | None  # the input's computed channels (None: all)
    inputs: torch.Tensor
    input_shape: torch.Size  # before flattening
    outputs: torch.Tensor | None = None
    saved: tuple | None = None
    fused: bool = False
    nnpack: bool = False


#: Gradients of kept rows only: weight -> (row indices, the rows' gradient); every other row's gradient is 0.
RowGradients = dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def chain_gradients(
    stages: list[tuple[CompactLayer, str]], inputs: torch.Tensor, labels: torch.Tensor, rows: RowGradients | None = None
) -> torch.Tensor:
    """The mean cross-entropy of the chain's logits; every weight's and training threshold's gradient is added to ``.grad``.

    What ``loss = F.cross_entropy(model(inputs), labels); loss.backward()``
    gives under compact execution, bit for bit, including the layers'
    ``kept_fraction`` and ``computed_units``. With ``rows`` (a dict, empty
    and each weight's ``.grad`` None), the gradient of a weight of which
    only kept rows were computed goes into ``rows`` instead of a full-size
    ``.grad`` that is 0 outside them (see :func:`spafl.algorithms.spafl.momentum_step`).
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("chain_gradients computes gradients: call it with gradients enabled")
    # each layer's plan depends on its own weight and threshold only; thresholds train only where grad mode is on
    plans = [layer.compact_plan() for layer, _ in stages]
    with torch.no_grad():
        return _chain_gradients(stages, plans, inputs, labels, rows)


def _chain_gradients(stages, plans: list[CompactUnits], inputs: torch.Tensor, labels: torch.Tensor, rows: RowGradients | None) -> torch.Tensor:
    steps = []
    x: torch.Tensor = inputs
    sliced: Sliced | None = None  # x's computed channels, when not all are
    for position, ((layer, stage), units) in enumerate(zip(stages, plans)):
        weight, _ = compact_units(layer.weight, None, units.rows, units.mask)
        input_shape = x.shape
        if isinstance(layer, CompactLinear) and x.dim() > 2:
            if sliced is not None:
                sliced = flatten(sliced.with_values(x, None))
            x = x.flatten(1)
        index = None if sliced is None else sliced.index
        used = weight if index is None else weight.index_select(1, index)
        step = _Step(layer, stage, units, weight, used, index, x, input_shape)
        if stage == "relu_pool2":
            assert isinstance(layer, CompactConv2d)
            step.fused = layer.unfolds(position > 0)
            if step.fused:
                out, step.saved = conv_relu_pool2x2_forward(x, used, layer.padding)
            else:  # the conv layer.forward runs (kernels.conv2d)
                conv, step.nnpack = conv2d_forward(x, used, layer.stride, layer.padding, layer.dilation, layer.groups)
                out, step.saved = relu_max_pool2x2_forward(conv)
        elif stage == "relu":
            out = step.outputs = F.relu(F.linear(x, used))
        else:
            out = F.linear(x, used)
            if units.rows is not None:
                out = out.new_zeros(out.shape[0], layer.num_units).index_copy(1, units.rows, out)
        steps.append(step)
        x = out
        kept = units.rows is not None
        sliced = Sliced(out, units.rows, units.plan.dropped, layer.num_units, memo=units.plan.memo) if kept else None

    log_probabilities = torch.log_softmax(x, 1)
    loss, total_weight = torch.ops.aten.nll_loss_forward(log_probabilities, labels, None, _MEAN, _IGNORE)
    grad = torch.ops.aten.nll_loss_backward(torch.ones_like(loss), log_probabilities, labels, None, _MEAN, _IGNORE, total_weight)
    grad = torch.ops.aten._log_softmax_backward_data(grad, log_probabilities, 1, log_probabilities.dtype)
    for position in range(len(steps) - 1, -1, -1):
        grad = _backward(steps[position], grad, position > 0, rows)
    return loss


def _backward(step: _Step, grad: torch.Tensor, input_needs_grad: bool, rows: RowGradients | None) -> torch.Tensor | None:
    """Accumulate one stage's weight and threshold gradients from ``grad`` at its output; return its input's gradient."""
    layer, units, x = step.layer, step.units, step.inputs
    grad_x = None
    if step.stage == "relu_pool2":
        assert isinstance(layer, CompactConv2d)
        if step.fused:
            grad_used = conv_relu_pool2x2_backward(step.saved, grad)
        else:
            grad_out = relu_max_pool2x2_backward(step.saved, grad)
            grad_x, grad_used = conv2d_backward(
                grad_out, x, step.used, layer.stride, layer.padding, layer.dilation, layer.groups, input_needs_grad, step.nnpack
            )
    else:
        if step.stage == "relu":
            grad = torch.ops.aten.threshold_backward(grad, step.outputs, 0)
        elif units.rows is not None:
            grad = grad.index_select(1, units.rows)
        # F.linear without bias is mm(x, W.t()); these are the two products autograd's mm backward runs
        grad_used = grad.t().mm(x)
        if input_needs_grad:
            grad_x = _mm_input_grad(grad, step.used, x)
    grad_weight = grad_used
    if step.index is not None:
        grad_weight = step.weight.new_zeros(step.weight.shape).index_add_(1, step.index, grad_used)
    saved = (layer.weight, None, units.rows, units.mask, units.derivative, step.weight, None)
    by_rows = rows is not None and units.rows is not None
    grad_full, _, grad_threshold = compact_units_backward(saved, units.trains, layer.num_units, grad_weight, None, scatter=not by_rows)
    if by_rows:
        assert rows is not None and units.rows is not None and layer.weight.grad is None and layer.weight not in rows
        rows[layer.weight] = (units.rows, grad_full)
    else:
        _accumulate(layer.weight, grad_full)
    if grad_threshold is not None:
        _accumulate(layer.threshold, grad_threshold)
    return None if grad_x is None else grad_x.view(step.input_shape)


def _mm_input_grad(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x``'s gradient of ``mm(x, weight.t())`` as autograd computes it (column-major order for a column-major ``x``)."""
    if x.stride(0) == 1 and x.stride(1) == x.shape[0]:
        return weight.t().mm(grad.t()).t()
    return grad.mm(weight)


def _accumulate(parameter: torch.Tensor, grad: torch.Tensor) -> None:
    if parameter.grad is None:
        parameter.grad = grad
    else:
        parameter.grad.add_(grad)
