"""Compact execution: compute only the kept units of masked layers, where that is exact.

A masked layer multiplies a pruned unit's weights by 0, so computing that
unit is wasted work, and so is the next layer's work on the channel it
feeds. With compact execution on (:func:`spafl.fast.enable`), a masked layer
index-selects its kept output units and runs the smaller conv/linear; the
next layer receives a :class:`Sliced` activation (only the kept channels)
and uses only the matching input columns of its weight.

When is dropping a pruned unit exact (equal outputs and equal gradients of
all weights and thresholds)? Its output is exactly 0 in the dense masked
computation. Its weights and threshold get loss gradient only through the
straight-through estimator, proportional to the gradient at its output.
So dropping it is exact when

* no gradient is being computed (evaluation);
* its threshold is frozen (``requires_grad`` off: local epochs before the
  last under ``threshold_schedule=last_epoch``), because the mask is then a
  constant (see :meth:`spafl.nn.MaskedLayer.masked_parameters`);
* the estimator's derivative is 0 at every pruned unit (``outside_unit``
  where all pruned units have ``|s - tau| <= 1``: checked at every forward);
* the unit's output goes straight into a ReLU (the role :mod:`spafl.fast.models`
  records for that layer of the model): ReLU passes no gradient at 0.

It is *not* exact, and the layer computes every unit, for the last layer
(a pruned logit still gets a cross-entropy gradient) and for a layer whose
output goes into BatchNorm (in training mode BN turns the all-zero channel
into its shift beta and gives it a large gradient), while thresholds train
with a non-zero estimator derivative.

A dropped channel that passes through BatchNorm is no longer 0 but a
per-channel constant (beta in training mode; a function of the running
statistics in evaluation). :class:`Sliced` carries those constants, and the
next layer adds their contribution as a bias, which is exact for a linear
layer and for a conv without padding. Anything else (a padded conv, an op
that does not know :class:`Sliced`) materializes the full tensor.

Which role each masked layer's output plays, and a forward written with
:func:`relu`, :func:`max_pool2d`, :func:`flatten` and
:class:`CompactBatchNorm2d`/``1d`` (which accept plain tensors and
:class:`Sliced` alike), are kept for the models spafl ships in
:mod:`spafl.fast.models`. Any other model still gets compact evaluation:
each layer computes its kept units and scatters them back into a zero tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spafl.fast.kernels import relu_max_pool2x2

#: Roles a model may declare for a masked layer's output.
ROLES = ("relu", "norm", "logits")


@dataclass
class Sliced:
    """Channels (dim 1) ``index`` of a ``width``-channel activation; the others are constants.

    ``values`` is ``[B, len(index), ...]``. Channel ``dropped[j]`` holds the
    constant ``fill[j]`` everywhere (0 when ``fill`` is None).
    """

    values: torch.Tensor
    index: torch.Tensor
    dropped: torch.Tensor
    width: int
    fill: torch.Tensor | None = None
    #: indices derived from ``index`` and ``dropped`` (by :func:`flatten`), kept for as long as they do not change
    memo: dict | None = None

    def full(self) -> torch.Tensor:
        """The activation with all ``width`` channels."""
        shape = (self.values.shape[0], self.width, *self.values.shape[2:])
        out = self.values.new_zeros(shape)
        if self.fill is not None:
            view = (1, -1) + (1,) * (self.values.dim() - 2)
            out = out.index_copy(1, self.dropped, self.fill.view(view).expand(shape[0], -1, *shape[2:]))
        return out.index_copy(1, self.index, self.values)

    def with_values(self, values: torch.Tensor, fill: torch.Tensor | None) -> Sliced:
        return Sliced(values, self.index, self.dropped, self.width, fill, self.memo)


def full(x: torch.Tensor | Sliced) -> torch.Tensor:
    return x.full() if isinstance(x, Sliced) else x


def relu(x: torch.Tensor | Sliced) -> torch.Tensor | Sliced:
    if isinstance(x, Sliced):
        return x.with_values(F.relu(x.values), None if x.fill is None else F.relu(x.fill))
    return F.relu(x)


def max_pool2d(x: torch.Tensor | Sliced, kernel_size: int) -> torch.Tensor | Sliced:
    """Max pooling without padding: a constant channel stays the same constant."""
    if isinstance(x, Sliced):
        return x.with_values(F.max_pool2d(x.values, kernel_size), x.fill)
    return F.max_pool2d(x, kernel_size)


def relu_max_pool2d(x: torch.Tensor | Sliced, kernel_size: int, fused: bool = False) -> torch.Tensor | Sliced:
    """``max_pool2d(relu(x), kernel_size)``; ``fused`` (compact execution) computes a 2 x 2 pool without ``max_pool2d``.

    Both give bit-identical values and gradients (see :func:`spafl.fast.kernels.relu_max_pool2x2`).
    """
    if not fused or kernel_size != 2:
        return max_pool2d(relu(x), kernel_size)
    if isinstance(x, Sliced):
        return x.with_values(relu_max_pool2x2(x.values), None if x.fill is None else F.relu(x.fill))
    return relu_max_pool2x2(x)


def flatten(x: torch.Tensor | Sliced) -> torch.Tensor | Sliced:
    """``torch.flatten(x, 1)``; a sliced channel becomes its block of features."""
    if not isinstance(x, Sliced):
        return torch.flatten(x, 1)
    per_channel = math.prod(x.values.shape[2:])
    key = ("flatten", per_channel)
    if x.memo is not None and key in x.memo:
        index, dropped, memo = x.memo[key]
    else:
        offsets = torch.arange(per_channel, device=x.index.device)

        def expand(channels: torch.Tensor) -> torch.Tensor:
            return (channels.view(-1, 1) * per_channel + offsets).flatten()

        index, dropped, memo = expand(x.index), expand(x.dropped), {}
        if x.memo is not None:
            x.memo[key] = (index, dropped, memo)
    fill = None if x.fill is None else x.fill.repeat_interleave(per_channel)
    return Sliced(torch.flatten(x.values, 1), index, dropped, x.width * per_channel, fill, memo)


class _CompactBatchNorm:
    """BatchNorm that also normalizes a :class:`Sliced` input channel by channel."""

    def forward(self, x):  # type: ignore[override]
        if not isinstance(x, Sliced):
            return super().forward(x)  # type: ignore[misc]
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        batch_stats = bn.training or bn.running_mean is None
        index, dropped = x.index, x.dropped
        weight = None if bn.weight is None else bn.weight.index_select(0, index)
        bias = None if bn.bias is None else bn.bias.index_select(0, index)
        mean = var = None
        if bn.running_mean is not None:
            mean, var = bn.running_mean.index_select(0, index), bn.running_var.index_select(0, index)
        values = F.batch_norm(x.values, mean, var, weight, bias, batch_stats, factor, bn.eps)
        constant = x.fill if x.fill is not None else x.values.new_zeros(dropped.numel())
        if batch_stats:
            # a constant channel has batch mean = the constant and variance 0: it normalizes to 0
            normalized = torch.zeros_like(constant)
        else:
            normalized = (constant - bn.running_mean[dropped]) / torch.sqrt(bn.running_var[dropped] + bn.eps)
        fill = normalized
        if bn.weight is not None:
            fill = fill * bn.weight.index_select(0, dropped) + bn.bias.index_select(0, dropped)
        if bn.training and bn.running_mean is not None:
            with torch.no_grad():
                bn.running_mean.index_copy_(0, index, mean)
                bn.running_var.index_copy_(0, index, var)
                dropped_mean = bn.running_mean.index_select(0, dropped)
                bn.running_mean.index_copy_(0, dropped, dropped_mean * (1 - factor) + factor * constant.detach())
                bn.running_var.index_copy_(0, dropped, bn.running_var.index_select(0, dropped) * (1 - factor))
        return x.with_values(values, fill)


class CompactBatchNorm1d(_CompactBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also accepts a :class:`Sliced` input (same parameters and state-dict keys)."""


class CompactBatchNorm2d(_CompactBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also accepts a :class:`Sliced` input (same parameters and state-dict keys)."""
