"""Compact masked layers: the same function as :mod:`spafl.nn.masked`, computed from the kept units only.

:func:`spafl.fast.enable` turns a model's :class:`~spafl.nn.MaskedLinear` and
:class:`~spafl.nn.MaskedConv2d` into :class:`CompactLinear` and
:class:`CompactConv2d` (the class of each module is swapped; parameters,
buffers and state-dict keys stay). A compact layer index-selects its kept
units and runs the smaller conv/linear wherever that gives exactly the
masked dense result (:mod:`spafl.fast.compact` says when), with one
autograd function for the masked weights (:class:`_UnitsOf`) instead of the
graph of ``|W|``, its mean, the estimator and the product; a conv runs on
unfolded windows, NNPACK or oneDNN (:mod:`spafl.fast.kernels`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from spafl.fast.compact import Sliced, full, relu_max_pool2d
from spafl.fast.kernels import conv2d, unfolded_conv2d, unfolded_conv_relu_pool2x2
from spafl.nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear, per_unit
from spafl.nn.ste import step_derivative

#: Compact execution computes a conv with at most this fan-in (in_channels * kh * kw) from unfolded windows.
UNFOLD_MAX_FAN_IN = 75


class _UnitsOf(torch.autograd.Function):
    """The masked weights ``(W~, b~)`` of compact execution, all units or only the kept ``rows``, with hand-written gradients.

    With ``rows`` None every unit is computed and the values are ``W * m`` and
    ``b * m`` (``mask`` = m, a 0/1 constant). With ``rows`` only kept units
    are computed, whose mask is exactly 1: the values are ``W[rows]`` and
    ``b[rows]``. While thresholds train (``trains``), backward gives what
    autograd through ``|W|``, its mean, the estimator and the product gives
    (``derivative``: step'(s_i - tau_i) of the computed units; None for the
    ``identity`` estimator, whose derivative is 1)::

        dL/dm_i   = sum_j g_ij W_ij (+ g_bias_i b_i)
        dL/dW_ij  = m_i g_ij + step'_i dL/dm_i sign(W_ij) / n_i      dL/dtau_i = -step'_i dL/dm_i

    and 0 for a unit not computed, which is what the dense masked
    computation gives wherever :mod:`spafl.fast.compact` drops units. With
    thresholds frozen the mask is a constant: ``dL/dW_ij = m_i g_ij``. One
    function instead of the autograd graph of ``|W|``, its mean, the step
    and the product saves several passes over the whole weight and a dozen
    operators per layer and step.
    """

    @staticmethod
    def forward(ctx, weight, bias, threshold, rows, mask, trains, derivative):  # type: ignore[override]
        units, units_bias = compact_units(weight, bias, rows, mask)
        # the unmasked weights of the computed units: for kept rows the outputs themselves, saved without a copy
        ctx.save_for_backward(weight, bias, rows, mask, derivative, units, units_bias)
        ctx.trains = trains
        ctx.num_units = threshold.shape[0]
        return units, units_bias

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weight, grad_bias):  # type: ignore[override]
        weight, bias, rows, mask, derivative, units, units_bias = ctx.saved_tensors
        grads = compact_units_backward(
            (weight, bias, rows, mask, derivative, units, units_bias), ctx.trains, ctx.num_units, grad_weight, grad_bias
        )
        return (*grads, None, None, None, None)


def compact_units(weight, bias, rows, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values of :class:`_UnitsOf`: ``W[rows], b[rows]``, or ``W * m, b * m`` when ``rows`` is None."""
    if rows is None:
        return weight * per_unit(mask, weight), None if bias is None else bias * mask
    return weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows)


def compact_units_backward(saved, trains: bool, num_units: int, grad_weight, grad_bias, scatter: bool = True):
    """:class:`_UnitsOf`'s gradients ``(dL/dW, dL/db, dL/dtau)`` from those of its outputs.

    ``saved`` is ``(weight, bias, rows, mask, derivative, units, units_bias)``;
    ``dL/dtau`` is None unless ``trains``. With ``scatter`` off and kept
    ``rows``, ``dL/dW`` and ``dL/db`` are only those rows (the others are 0).
    """
    weight, bias, rows, mask, derivative, units, units_bias = saved
    if bias is None or grad_bias is None:
        grad_bias = None
    if rows is None:
        unmasked, unmasked_bias = weight, bias
        grad_units = grad_weight * per_unit(mask, weight)
        grad_units_bias = None if grad_bias is None else grad_bias * mask
    else:
        unmasked, unmasked_bias = units, units_bias
        grad_units, grad_units_bias = grad_weight, grad_bias
    grad_threshold = None
    if trains:
        grad_mask = (grad_weight * unmasked).flatten(1).sum(1)
        if grad_bias is not None:
            grad_mask = grad_mask + grad_bias * unmasked_bias
        if derivative is not None:
            grad_mask = grad_mask * derivative
        grad_units = grad_units + per_unit(grad_mask / unmasked[0].numel(), unmasked) * unmasked.sign()
        grad_threshold = -grad_mask
        if rows is not None:
            grad_threshold = grad_mask.new_zeros(num_units).index_copy_(0, rows, grad_threshold)
    if rows is None or not scatter:
        return grad_units, grad_units_bias, grad_threshold
    grad_full = torch.zeros_like(weight).index_copy_(0, rows, grad_units)
    grad_b = None if grad_bias is None else torch.zeros_like(bias).index_copy_(0, rows, grad_bias)
    return grad_full, grad_b, grad_threshold


class _Plan:
    """A layer's kept units and the indices derived from them, reused for as long as the kept set does not change.

    Between two steps of local training a layer's kept set rarely changes, so
    its indices (and those that :func:`spafl.fast.compact.flatten` derives, in
    ``memo``) are computed once per change instead of once per forward.
    """

    __slots__ = ("kept", "rows", "dropped", "memo", "_mask")

    def __init__(self, kept: torch.Tensor) -> None:
        self.kept = kept
        self.rows = kept.nonzero().squeeze(1)
        self.dropped = (~kept).nonzero().squeeze(1)
        self.memo: dict = {}
        self._mask: torch.Tensor | None = None

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The kept set as 0/1 values of ``dtype``."""
        if self._mask is None or self._mask.dtype != dtype:
            self._mask = self.kept.to(dtype)
        return self._mask

    def matches(self, kept: torch.Tensor) -> bool:
        return self.kept.device == kept.device and torch.equal(self.kept, kept)


class CompactUnits(NamedTuple):
    """What a compact forward computes (see :meth:`MaskedLayer.compact_plan`).

    ``rows``: the kept units' indices, when only they are computed; else None
    and ``mask`` (0/1 per unit) multiplies every unit. ``trains``: whether the
    thresholds get gradients. ``derivative``: the estimator's derivative at
    the computed units (None for ``identity``, whose derivative is 1).
    """

    rows: torch.Tensor | None
    mask: torch.Tensor | None
    trains: bool
    derivative: torch.Tensor | None
    plan: _Plan


class CompactLayer(MaskedLayer):
    """What :class:`CompactLinear` and :class:`CompactConv2d` share: which units a forward computes, and how.

    ``compact_role`` says where the layer's output goes (:data:`spafl.fast.compact.ROLES`;
    None: unknown, kept units are computed and scattered back into a full tensor).
    """

    compact_role: str | None = None
    #: Output units the last compact forward computed (for tests and benchmarks).
    computed_units: int = 0
    _plan: _Plan | None = None

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu_pool: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def _constant_input(self, weight: torch.Tensor, x: Sliced) -> torch.Tensor | None:
        """The output contribution of ``x``'s constant channels (None: they are 0 or not exactly representable)."""
        raise NotImplementedError

    def _accepts_sliced(self, x: Sliced) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | Sliced, relu_pool: int = 0) -> torch.Tensor | Sliced:  # type: ignore[override]
        """The layer's output; with ``relu_pool=k`` (convs), ``max_pool2d(relu(output), k)``, fused where it can be."""
        if relu_pool and self.compact_role not in (None, "relu"):
            raise ValueError(f"relu_pool needs the layer's output to go into ReLU, but its compact role is {self.compact_role!r}")
        if self.masking:
            return self._compact_forward(x, relu_pool)
        weight, bias = self.masked_parameters()
        return self._compute(full(x), weight, bias, relu_pool)

    def _pruned_units_need_no_gradient(self, gap: torch.Tensor, dropped: torch.Tensor) -> bool:
        """Whether dropping the pruned units leaves every gradient unchanged (module docstring of spafl.fast.compact)."""
        if not self._trains_thresholds() or self.compact_role == "relu":
            return True
        if self.ste == "identity":  # its derivative is 1 everywhere
            return dropped.numel() == 0
        return not bool(step_derivative(gap.index_select(0, dropped), self.ste).any())

    def _kept_plan(self, kept: torch.Tensor) -> _Plan:
        if self._plan is None or not self._plan.matches(kept):
            self._plan = _Plan(kept)
        return self._plan

    def compact_plan(self) -> CompactUnits:
        """Which units this compact forward computes, and how (no graph); updates ``kept_fraction`` and ``computed_units``."""
        self._apply_collapse_guard()
        trains = self._trains_thresholds()
        with torch.no_grad():  # the estimator's gradient comes from _UnitsOf's backward
            gap = self.unit_scores() - self.threshold
            plan = self._kept_plan(gap > 0)
        num_kept = plan.rows.numel()
        # the mean of the 0/1 mask, exactly: a quotient of integers below 2**24, correctly rounded
        self.kept_fraction.fill_(num_kept / self.num_units)
        rows = mask = None
        if 0 < num_kept < self.num_units and self._drops_units() and self._pruned_units_need_no_gradient(gap, plan.dropped):
            rows = plan.rows
        else:
            mask = plan.mask(self.weight.dtype)
        self.computed_units = self.num_units if rows is None else num_kept
        derivative = None
        if trains and self.ste != "identity":
            derivative = step_derivative(gap if rows is None else gap.index_select(0, rows), self.ste)
        return CompactUnits(rows, mask, trains, derivative, plan)

    def _compact_forward(self, x: torch.Tensor | Sliced, relu_pool: int) -> torch.Tensor | Sliced:
        units = self.compact_plan()
        rows, plan = units.rows, units.plan
        weight, bias = _UnitsOf.apply(self.weight, self.bias, self.threshold, rows, units.mask, units.trains, units.derivative)
        if isinstance(x, Sliced) and self._accepts_sliced(x):
            constant = self._constant_input(weight, x)
            if constant is not None:
                bias = constant if bias is None else bias + constant
            out = self._compute(x.values, weight.index_select(1, x.index), bias, relu_pool)
        else:
            out = self._compute(full(x), weight, bias, relu_pool)
        if rows is None:
            return out
        dim = self._unit_dim(out)
        if self.compact_role in ("relu", "norm") and dim == 1:
            return Sliced(out, rows, plan.dropped, self.num_units, memo=plan.memo)
        shape = list(out.shape)
        shape[dim] = self.num_units
        return out.new_zeros(shape).index_copy(dim, rows, out)

    def _drops_units(self) -> bool:
        return True

    @staticmethod
    def _unit_dim(out: torch.Tensor) -> int:
        return 1


class CompactLinear(CompactLayer, MaskedLinear):
    """:class:`~spafl.nn.MaskedLinear` computed from its kept units."""

    def _compute(self, x, weight, bias, relu_pool=0):
        if relu_pool:
            raise ValueError("relu_pool applies to convolutions only")
        return F.linear(x, weight, bias)

    def _accepts_sliced(self, x):
        return x.values.dim() == 2

    @staticmethod
    def _unit_dim(out):
        return out.dim() - 1  # units are the last dimension ([B, out] or [B, T, out])

    def _constant_input(self, weight, x):
        if x.fill is None:
            return None
        return weight.index_select(1, x.dropped) @ x.fill


class CompactConv2d(CompactLayer, MaskedConv2d):
    """:class:`~spafl.nn.MaskedConv2d` computed from its kept filters, on the fastest exact kernel."""

    def _compute(self, x, weight, bias, relu_pool=0):
        unfolds = self.unfolds(x.requires_grad and torch.is_grad_enabled())
        if unfolds and relu_pool == 2 and bias is None and self.stride == (1, 1) and self.dilation == (1, 1):
            return unfolded_conv_relu_pool2x2(x, weight, self.padding)
        if unfolds:
            out = unfolded_conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        else:
            out = conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return relu_max_pool2d(out, relu_pool, fused=True) if relu_pool else out

    def unfolds(self, input_needs_grad: bool) -> bool:
        """Whether this conv is computed as a matrix product (small fan-in, no input gradient)."""
        return self.fan_in <= UNFOLD_MAX_FAN_IN and self.groups == 1 and not isinstance(self.padding, str) and not input_needs_grad

    def _drops_units(self):
        return self.groups == 1  # a subset of filters would regroup the input channels

    def _accepts_sliced(self, x):
        # a constant channel is a per-filter bias only where no zero padding reaches the window
        padded = any(p != 0 for p in self.padding) if isinstance(self.padding, tuple) else self.padding != "valid"
        return self.groups == 1 and (x.fill is None or not padded)

    def _constant_input(self, weight, x):
        if x.fill is None:
            return None
        return weight.index_select(1, x.dropped).sum(dim=(2, 3)) @ x.fill
