"""Straight-through estimators for the unit-keep step function.

The forward pass is always ``step(x) = 1 if x > 0 else 0``. The three
estimators differ only in the surrogate derivative used in the backward
pass, and each matches one branch of the reference code (SPEC §2):

``identity``
    d step/dx := 1 (FMNIST reference).
``outside_unit``
    d step/dx := 1 where |x| > 1, else 0 (CIFAR-10/100 reference). With usual
    weight scales |s - tau| is far below 1, so almost no gradient reaches the
    thresholds; kept as the reference has it, not "fixed".
``long_tailed``
    2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond (Dynamic
    Sparse Training, Liu et al., ICLR 2020).
"""

from __future__ import annotations

import torch

STE_NAMES = ("identity", "outside_unit", "long_tailed")


def step_derivative(x: torch.Tensor, ste: str) -> torch.Tensor:
    """The surrogate derivative of ``step`` at ``x`` for estimator ``ste``."""
    if ste == "identity":
        return torch.ones_like(x)
    magnitude = x.abs()
    if ste == "outside_unit":
        return (magnitude > 1).to(x.dtype)
    if ste == "long_tailed":
        near = 2 - 4 * magnitude
        tail = torch.full_like(x, 0.4)
        return torch.where(magnitude <= 0.4, near, torch.where(magnitude <= 1, tail, torch.zeros_like(x)))
    raise ValueError(f"unknown straight-through estimator {ste!r}; allowed: {', '.join(STE_NAMES)}")


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ste: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.ste = ste
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_output * step_derivative(x, ctx.ste), None


def step(x: torch.Tensor, ste: str = "identity") -> torch.Tensor:
    """Heaviside step (strictly positive -> 1) with a straight-through backward."""
    if ste not in STE_NAMES:
        raise ValueError(f"unknown straight-through estimator {ste!r}; allowed: {', '.join(STE_NAMES)}")
    return _Step.apply(x, ste)
