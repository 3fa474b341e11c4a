"""Linear and conv layers with one trainable pruning threshold per output unit.

For unit i (a row of a linear weight, an output filter of a conv weight)::

    s_i = mean_j |W_ij|         m_i = step(s_i - tau_i)         W~ = W * m

and the layer computes its usual function with ``W~``. Autograd through
``s`` and the straight-through ``step`` gives exactly the gradients of
SPEC §2::

    dL/dtau_i = -step'(s_i - tau_i) * sum_k g_ik W_ik
    dL/dW_ij  = m_i g_ij + step'(s_i - tau_i) * (sum_k g_ik W_ik) * sign(W_ij) / n_i

A pruned unit's bias is masked too, so the unit outputs exactly 0.

While a layer's thresholds are frozen (``requires_grad`` off, e.g. the local
epochs before the last under ``threshold_schedule=last_epoch``) the mask is a
constant: weights get gradient only through the kept units, not through
``s``. With ``compact`` on, the layer computes only its kept units where
that is exact (:mod:`spafl.nn.compact`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from spafl.nn.compact import Sliced, full, relu_max_pool2d
from spafl.nn.kernels import conv2d, unfolded_conv2d, unfolded_conv_relu_pool2x2
from spafl.nn.ste import STE_NAMES, step, step_derivative

#: A layer whose kept fraction falls to this or below gets its thresholds reset.
COLLAPSE_FRACTION = 0.01

#: Compact execution computes a conv with at most this fan-in (in_channels * kh * kw) from unfolded windows.
UNFOLD_MAX_FAN_IN = 75


def per_unit(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``values`` (one per unit, ``[out]``) shaped to broadcast over ``weight``'s rows."""
    return values.view(-1, *([1] * (weight.dim() - 1)))


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
    computation gives wherever :mod:`spafl.nn.compact` drops units. With
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
    its indices (and those that :func:`spafl.nn.compact.flatten` derives, in
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


class MaskedLayer(nn.Module):
    """Shared behaviour of :class:`MaskedLinear` and :class:`MaskedConv2d`.

    Attributes
    ----------
    threshold:
        Trainable tensor of shape ``[out]``, initialised to 0.
    ste:
        Name of the straight-through estimator (see :mod:`spafl.nn.ste`).
    collapse_guard:
        Reference behaviour: at the start of every forward pass (evaluation
        included), if the kept fraction measured at the *previous* forward
        pass was <= 1 %, all thresholds of this layer are reset to 0.
    kept_fraction:
        Buffer holding the kept-unit fraction of the last forward pass.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    threshold: nn.Parameter
    kept_fraction: torch.Tensor

    def _init_masking(self, ste: str, collapse_guard: bool) -> None:
        if ste not in STE_NAMES:
            raise ValueError(f"unknown straight-through estimator {ste!r}; allowed: {', '.join(STE_NAMES)}")
        self.ste = ste
        self.collapse_guard = collapse_guard
        self.masking = True
        self.compact = False
        self.compact_role: str | None = None
        #: Output units the last compact forward computed (for tests and benchmarks).
        self.computed_units = self.weight.shape[0]
        self._plan: _Plan | None = None
        self.threshold = nn.Parameter(torch.zeros(self.weight.shape[0], device=self.weight.device, dtype=self.weight.dtype))
        self.register_buffer("kept_fraction", torch.ones((), device=self.weight.device, dtype=self.weight.dtype))

    @property
    def num_units(self) -> int:
        return self.weight.shape[0]

    @property
    def fan_in(self) -> int:
        """n_i: number of incoming weights of one unit ((in/groups)*kh*kw for conv)."""
        return self.weight[0].numel()

    def unit_scores(self) -> torch.Tensor:
        """s_i = mean |W_i,:| (differentiable)."""
        return self.weight.abs().flatten(1).mean(dim=1)

    def unit_mask(self) -> torch.Tensor:
        """m_i in {0, 1} with the straight-through gradient attached."""
        return step(self.unit_scores() - self.threshold, self.ste)

    @torch.no_grad()
    def kept_units(self) -> torch.Tensor:
        """Boolean ``[out]`` tensor of kept units (no graph, no side effects); all with masking off."""
        if not self.masking:
            return torch.ones(self.num_units, dtype=torch.bool, device=self.weight.device)
        return self.weight.abs().flatten(1).mean(dim=1) - self.threshold > 0

    def density(self) -> float:
        """Kept weights / all weights of this layer (bias not counted)."""
        return float(self.kept_units().float().mean())

    def _apply_collapse_guard(self) -> None:
        if self.collapse_guard and float(self.kept_fraction) <= COLLAPSE_FRACTION:
            with torch.no_grad():
                self.threshold.zero_()

    def _trains_thresholds(self) -> bool:
        return self.threshold.requires_grad and torch.is_grad_enabled()

    def _current_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's mask (with the estimator attached while thresholds train, a constant otherwise) and s - tau, detached."""
        self._apply_collapse_guard()
        if self._trains_thresholds():
            gap = self.unit_scores() - self.threshold
            mask = step(gap, self.ste)
        else:
            with torch.no_grad():
                gap = self.unit_scores() - self.threshold
            mask = (gap > 0).to(self.weight.dtype)
        with torch.no_grad():
            self.kept_fraction.copy_(mask.detach().mean())
        return mask, gap.detach()

    def _unit_view(self, mask: torch.Tensor) -> torch.Tensor:
        return per_unit(mask, self.weight)

    def masked_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W~, b~)`` for this forward pass; updates ``kept_fraction``.

        With ``masking`` off (dense baselines) the plain weights are used and
        the threshold takes no part in the forward or backward pass.
        """
        if not self.masking:
            return self.weight, self.bias
        mask, _ = self._current_mask()
        weight = self.weight * self._unit_view(mask)
        bias = None if self.bias is None else self.bias * mask
        return weight, bias

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu_pool: int) -> torch.Tensor:
        raise NotImplementedError

    def _constant_input(self, weight: torch.Tensor, x: Sliced) -> torch.Tensor | None:
        """The output contribution of ``x``'s constant channels (None: they are 0 or not exactly representable)."""
        raise NotImplementedError

    def _accepts_sliced(self, x: Sliced) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | Sliced, relu_pool: int = 0) -> torch.Tensor | Sliced:
        """The layer's output; with ``relu_pool=k`` (convs), ``max_pool2d(relu(output), k)``, which compact execution may fuse."""
        if relu_pool and self.compact_role not in (None, "relu"):
            raise ValueError(f"relu_pool needs the layer's output to go into ReLU, but its compact role is {self.compact_role!r}")
        if self.compact and self.masking:
            return self._compact_forward(x, relu_pool)
        weight, bias = self.masked_parameters()
        return self._compute(full(x), weight, bias, relu_pool)

    def _pruned_units_need_no_gradient(self, gap: torch.Tensor, dropped: torch.Tensor) -> bool:
        """Whether dropping the pruned units leaves every gradient unchanged (module docstring of spafl.nn.compact)."""
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


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with a trainable threshold per output neuron."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        ste: str = "identity",
        collapse_guard: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_masking(ste, collapse_guard)

    @property
    def importance_fan_in(self) -> int:
        """n_i' of the importance update: ``in_features`` (SPEC §4 step 3)."""
        return self.in_features

    def _compute(self, x, weight, bias, relu_pool):
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ste={self.ste}"


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """``nn.Conv2d`` with a trainable threshold per output filter."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        ste: str = "identity",
        collapse_guard: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, device=device, dtype=dtype,
        )
        if self.padding_mode != "zeros":
            raise ValueError("MaskedConv2d supports padding_mode='zeros' only")
        self._init_masking(ste, collapse_guard)

    @property
    def importance_fan_in(self) -> int:
        """n_i' of the importance update: kernel area kh*kw, as the reference (SPEC §4 step 3)."""
        return self.kernel_size[0] * self.kernel_size[1]

    def _compute(self, x, weight, bias, relu_pool):
        unfolds = self.compact and self.unfolds(x.requires_grad and torch.is_grad_enabled())
        if unfolds and relu_pool == 2 and bias is None and self.stride == (1, 1) and self.dilation == (1, 1):
            return unfolded_conv_relu_pool2x2(x, weight, self.padding)
        if unfolds:
            out = unfolded_conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        elif self.compact:
            out = conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            out = self._conv_forward(x, weight, bias)
        return relu_max_pool2d(out, relu_pool, fused=self.compact) if relu_pool else out

    def unfolds(self, input_needs_grad: bool) -> bool:
        """Whether compact execution computes this conv as a matrix product (small fan-in, no input gradient)."""
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ste={self.ste}"
