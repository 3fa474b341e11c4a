"""Linear and conv layers with one trainable pruning threshold per output unit (SPEC §2).

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
``s``. How fast this is computed is not this module's concern: the speed
package :mod:`spafl.fast` computes the same function from the kept units only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spafl.nn.ste import STE_NAMES, step

#: A layer whose kept fraction falls to this or below gets its thresholds reset.
COLLAPSE_FRACTION = 0.01


def per_unit(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``values`` (one per unit, ``[out]``) shaped to broadcast over ``weight``'s rows."""
    return values.view(-1, *([1] * (weight.dim() - 1)))


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
        ``kept_fraction`` is part of the state dict, so a client's next
        forward pass (its evaluation, or its next round's training) sees the
        fraction of the last one it made, wherever that ran.
    kept_fraction:
        Buffer holding the kept-unit fraction of the last forward pass.
    guard_resets:
        How many times this module's guard has fired (a counter for the
        caller to difference; not part of the state dict).
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
        self.guard_resets = 0
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
            self.guard_resets += 1

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

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.masked_parameters()
        return self._compute(x, weight, bias)


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

    def _compute(self, x, weight, bias):
        return F.linear(x, weight, bias)

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

    def _compute(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ste={self.ste}"
