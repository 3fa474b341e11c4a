"""Per-weight 0/1 masks over a model's masked layers' weights, shared by the unstructured-sparsity baselines.

SpaFL masks whole units (:mod:`spafl.nn`); FedPM, FedSpa, LotteryFL and
FedP3 mask single weights. Their masks are plain data, the same in every
one of them:

* a mask set is a ``dict[str, torch.Tensor]`` from the **state-dict key of a
  masked layer's weight** (``"conv1.weight"``, ``"fc1.weight"``, ...; see
  :func:`masked_weight_shapes`) to a ``bool`` tensor of that weight's shape,
  ``True`` = kept. A bool tensor is also how a mask travels: the channel
  counts it as one bit per weight (:mod:`spafl.metrics.bits`);
* biases, BatchNorm and unmasked layers (a ViT's patch embedding, ResNet's
  head) are never masked and never counted in a density;
* every function returns new tensors (never changes its arguments) unless
  its name ends in ``_`` (then it changes the model in place).

Densities come in the two definitions SpaFL reports (SPEC §2):
:func:`mask_densities` gives ``(layer_mean, weighted)``, the unweighted mean
of per-layer kept fractions and kept / total over all masked weights.

Building masks: :func:`erk_densities` (Erdős–Rényi-Kernel per-layer
densities for a target overall density, as in RigL, Evci et al. 2020),
:func:`random_masks` (exactly ``round(d_l * n_l)`` random kept weights per
layer), :func:`magnitude_masks` (the largest-magnitude weights per layer),
:func:`prune_smallest` / :func:`regrow_largest` (move a given number of
positions of one layer's mask by weight magnitude / by a score such as a
gradient's magnitude). Ties are broken by position (the lower flat index
wins), so every result is deterministic.

Evaluating a masked model: an algorithm's ``evaluation_state`` returns the
model's state dict plus its masks under :data:`MASKS` (``"mask/<key>"``),
so that the density comes from the masks, not from counting zeros (a kept
weight may be exactly 0); :func:`split_masks` separates them again and
:func:`evaluate_masked` gives the :class:`~spafl.metrics.evaluation.ClientEval`
of a loaded dense (masking off) model with the masks' densities.
:class:`PerWeightMasking` puts both into an algorithm class (a mixin placed
before :class:`~spafl.algorithms.dense.DenseAlgorithm` or
:class:`~spafl.algorithms.base.Algorithm` in its bases), with the dense
training FLOPs of a model masked per weight (:meth:`PerWeightMasking.dense_flops`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from spafl.metrics.evaluation import ClientEval, evaluate_client
from spafl.metrics.flops import batches_per_epoch, dense_macs_per_sample, training_flops
from spafl.nn import masked_layers

Masks = dict[str, torch.Tensor]

#: prefix of the masks inside an evaluation state (see :func:`split_masks`)
MASKS = "mask/"


# -- which weights are masked ---------------------------------------------------
def masked_weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{state-dict key of a masked layer's weight: its shape}``, in module order."""
    return {f"{name}.weight": tuple(layer.weight.shape) for name, layer in masked_layers(model)}


def kept_count(density: float, numel: int) -> int:
    """How many of ``numel`` weights a layer of ``density`` keeps: ``round(density * numel)``, within [0, numel]."""
    return min(numel, max(0, int(round(density * numel))))


# -- using masks --------------------------------------------------------------------
def full_masks(shapes: dict[str, tuple[int, ...]]) -> Masks:
    """Masks that keep every weight."""
    return {key: torch.ones(shape, dtype=torch.bool) for key, shape in shapes.items()}


def apply_masks(weights: dict[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
    """A copy of the state dict ``weights`` whose masked entries are multiplied by their masks (others shared, unchanged)."""
    out = dict(weights)
    for key, mask in masks.items():
        out[key] = weights[key] * mask.to(device=weights[key].device, dtype=weights[key].dtype)
    return out


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> None:
    """Zero, in place, the weights of ``model`` that ``masks`` prunes."""
    state = model.state_dict()
    for key, mask in masks.items():
        state[key].mul_(mask.to(device=state[key].device, dtype=state[key].dtype))


@torch.no_grad()
def mask_gradients_(model: nn.Module, masks: Masks) -> None:
    """Zero, in place, the gradients of the pruned weights (a :class:`~spafl.algorithms.local_sgd.Hooks` ``after_gradients``)."""
    parameters = dict(model.named_parameters())
    for key, mask in masks.items():
        grad = parameters[key].grad
        if grad is not None:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


def gather_kept(weights: dict[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
    """Per masked weight, the 1-D tensor of its kept values in mask order (row-major flat order)."""
    return {key: weights[key].reshape(-1)[mask.reshape(-1).to(weights[key].device)].clone() for key, mask in masks.items()}


def scatter_kept(values: dict[str, torch.Tensor], masks: Masks, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`gather_kept`: a copy of ``base`` whose kept positions hold ``values`` (pruned ones keep ``base``)."""
    out = dict(base)
    for key, mask in masks.items():
        flat = base[key].reshape(-1).clone()
        flat[mask.reshape(-1)] = values[key].to(flat.dtype)
        out[key] = flat.view(base[key].shape)
    return out


# -- densities ------------------------------------------------------------------------
def layer_densities(masks: Masks) -> dict[str, float]:
    """Kept fraction of each masked weight."""
    return {key: float(mask.sum()) / mask.numel() if mask.numel() else 1.0 for key, mask in masks.items()}


def mask_densities(masks: Masks) -> tuple[float, float]:
    """``(layer_mean, weighted)`` density: the mean of per-layer kept fractions, and kept / total weights."""
    if not masks:
        return 1.0, 1.0
    per_layer = layer_densities(masks)
    total = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.sum()) for mask in masks.values())
    return sum(per_layer.values()) / len(per_layer), kept / total if total else 1.0


# -- building masks -----------------------------------------------------------------------
def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdős–Rényi-Kernel per-layer densities whose parameter-weighted mean is ``density`` (RigL, Evci et al. 2020).

    A layer's density is proportional to ``(sum of its weight's dims) /
    (product of its dims)`` raised to ``power_scale`` (conv: ``(out + in +
    kh + kw) / (out * in * kh * kw)``; linear: ``(out + in) / (out * in)``),
    scaled so that the kept weights total ``density * N``. A layer whose
    density would exceed 1 is made dense and the others are rescaled, as in
    RigL. Small layers thus stay denser than large ones.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {key: math.prod(shape) for key, shape in shapes.items()}
    raw = {key: (sum(shape) / numel[key]) ** power_scale for key, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[key] for key in dense)
        sparse = [key for key in shapes if key not in dense]
        divisor = sum(raw[key] * numel[key] for key in sparse)
        if not sparse or divisor <= 0:
            break
        epsilon = budget / divisor
        too_dense = [key for key in sparse if epsilon * raw[key] > 1.0]
        if not too_dense:
            break
        dense.update(too_dense)
    return {key: 1.0 if key in dense else epsilon * raw[key] for key in shapes}


def random_masks(shapes: dict[str, tuple[int, ...]], densities: dict[str, float], generator: torch.Generator) -> Masks:
    """Per layer, exactly :func:`kept_count` weights kept, chosen uniformly at random by ``generator`` (layers in ``shapes`` order)."""
    masks = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        chosen = torch.randperm(n, generator=generator)[: kept_count(densities[key], n)]
        flat = torch.zeros(n, dtype=torch.bool)
        flat[chosen] = True
        masks[key] = flat.view(shape)
    return masks


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` largest of the 1-D ``scores``; ties to the lower index (a stable sort)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def magnitude_masks(weights: dict[str, torch.Tensor], densities: dict[str, float]) -> Masks:
    """Per key of ``densities``, a mask keeping the :func:`kept_count` weights of largest magnitude."""
    masks = {}
    for key, density in densities.items():
        weight = weights[key].detach().cpu()
        flat = torch.zeros(weight.numel(), dtype=torch.bool)
        flat[_top(weight.reshape(-1).abs(), kept_count(density, weight.numel()))] = True
        masks[key] = flat.view(weight.shape)
    return masks


def prune_smallest(mask: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """``mask`` with its ``count`` kept weights of smallest magnitude pruned (all kept ones when ``count`` exceeds them)."""
    flat = mask.reshape(-1).clone()
    magnitude = weight.detach().cpu().reshape(-1).abs().to(torch.float64)
    # negated magnitudes, so that the smallest kept weights rank first; pruned positions rank last (-inf)
    scores = torch.where(flat, -magnitude, torch.tensor(-math.inf, dtype=torch.float64))
    flat[_top(scores, min(count, int(flat.sum())))] = False
    return flat.view(mask.shape)


def regrow_largest(mask: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """``mask`` with the ``count`` pruned positions of largest ``scores`` (e.g. ``|gradient|``) kept again."""
    flat = mask.reshape(-1).clone()
    values = scores.detach().cpu().reshape(-1).to(torch.float64)
    candidates = torch.where(flat, torch.tensor(-math.inf, dtype=torch.float64), values)
    flat[_top(candidates, min(count, int((~flat).sum())))] = True
    return flat.view(mask.shape)


def prune_fraction(masks: Masks, weights: dict[str, torch.Tensor], fraction: float) -> Masks:
    """Per layer, prune ``round(fraction * kept)`` of its kept weights, the smallest in magnitude (LotteryFL's step)."""
    return {
        key: prune_smallest(mask, weights[key], int(round(fraction * int(mask.sum())))) for key, mask in masks.items()
    }


# -- evaluation ------------------------------------------------------------------------------
def split_masks(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Masks]:
    """``(state dict, masks)`` from an evaluation state holding masks under :data:`MASKS`."""
    state = {key: value for key, value in weights.items() if not key.startswith(MASKS)}
    masks = {key[len(MASKS):]: value for key, value in weights.items() if key.startswith(MASKS)}
    return state, masks


def evaluate_masked(model: nn.Module, masks: Masks, data, batch_size: int, device: torch.device) -> ClientEval:
    """The test-split evaluation of ``model`` (already loaded with masked weights), with the densities of ``masks``."""
    density, density_weighted = mask_densities(masks)
    return dataclasses.replace(evaluate_client(model, data, batch_size, device), density=density, density_weighted=density_weighted)


class PerWeightMasking:
    """Mixin for an algorithm whose evaluation states carry masks under :data:`MASKS` (see the module docstring).

    ``mask_shapes`` (set at construction) is :func:`masked_weight_shapes` of the model;
    ``workspace(weights)`` loads the state without the masks;
    ``evaluate(weights, ...)`` evaluates it with the masks' densities;
    ``dense_flops(num_samples)`` is the reference training-FLOPs formula at
    density 1.0 in every layer (dense kernels under a per-weight mask
    compute every weight), without threshold work.
    """

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)  # type: ignore[call-arg]
        self.mask_shapes = masked_weight_shapes(spec.factory())

    def workspace(self, weights=None):
        return super().workspace(None if weights is None else split_masks(weights)[0])  # type: ignore[misc]

    def evaluate(self, weights, data, batch_size):
        state, masks = split_masks(weights)
        return evaluate_masked(self.workspace(state), masks, data, batch_size, self.device)  # type: ignore[attr-defined]

    def dense_flops(self, num_samples: int) -> float:
        config = self.config  # type: ignore[attr-defined]
        macs = getattr(self, "dense_macs", None)  # DenseAlgorithm has them
        if macs is None:
            macs = self.dense_macs = dense_macs_per_sample(self.spec.factory(), self.spec.input_shape)  # type: ignore[attr-defined]
        batches = config.local_epochs * batches_per_epoch(num_samples, config.batch_size)
        return training_flops(
            macs, {name: 1.0 for name in macs}, num_samples, config.local_epochs, batches, num_thresholds=0, num_masked_weights=0,
        )
