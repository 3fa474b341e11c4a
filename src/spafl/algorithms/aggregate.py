"""The server's weighted mean of the clients' tensors, in two numerics.

:func:`weighted_mean` accumulates in float64 (FedAvg and the baselines);
:func:`stacked_mean` stacks the float32 tensors and sums their scaled
copies in float32, as SpaFL's reference code averages thresholds, so that
spafl's SpaFL results stay those of the reference's arithmetic. The two
differ in the last bits (about 6e-8 on thresholds of order 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_mean(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_k weights[k] * tensors[k] / sum(weights)``, in the tensors' dtype.

    The sum is accumulated in float64, one client after the other in the
    given order, each term scaled by ``weights[k] / sum(weights)``; the result
    is rounded to the dtype once, at the end. Weights that sum to 0 or less
    (e.g. every client holds 0 samples) count as equal: the plain mean.
    """
    if not tensors or len(weights) != len(tensors):
        raise ValueError(f"weighted_mean needs one weight per tensor and at least one tensor; got {len(tensors)} tensors, {len(weights)} weights")
    if sum(weights) <= 0:
        weights = [1.0] * len(tensors)
    total = sum(weights)
    mean = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights):
        mean.add_(tensor.to(torch.float64), alpha=weight / total)
    return mean.to(tensors[0].dtype)


def stacked_mean(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_k tensors[k] * weights[k] / sum(weights)`` computed on the stacked tensors in their own dtype."""
    if not tensors or len(weights) != len(tensors):
        raise ValueError(f"stacked_mean needs one weight per tensor and at least one tensor; got {len(tensors)} tensors, {len(weights)} weights")
    stacked = torch.stack(tensors)
    coefficients = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1))) / sum(weights)
    return (stacked * coefficients).sum(dim=0)
