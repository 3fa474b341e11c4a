"""Dense training under per-weight masks: what FedP3 and LotteryFL share.

Both train a dense model (masking off, thresholds frozen: see
:mod:`spafl.algorithms.dense`) of which some single weights are pruned; a
mask set (:mod:`spafl.algorithms.weight_masks`: state-dict key of a masked
layer's weight -> bool tensor, True = kept) says which.

* :meth:`MaskedDenseAlgorithm.train_masked` zeroes the pruned weights, then
  runs the local epochs with a fresh SGD at the round's lr whose gradients of
  pruned weights are zeroed after every backward pass (a
  :class:`~spafl.algorithms.local_sgd.Hooks` ``after_gradients``, before any
  clipping). Pruned weights then stay exactly 0: a pruned weight's momentum
  buffer starts at its zero gradient and only ever adds zero gradients,
  weight decay adds ``wd * 0``, clipping scales a 0 to 0. The optimizer is
  fresh every round because both methods start every round from a model the
  server sent (so ``optimizer_scope`` does not apply, as for FedAvg).
* The compute is dense, so the FLOPs are the reference formula at density
  1.0 in every layer (:meth:`~spafl.algorithms.weight_masks.PerWeightMasking.dense_flops`),
  plus any extra forward passes a method makes (LotteryFL's accuracy check).
* Evaluation (:class:`~spafl.algorithms.weight_masks.PerWeightMasking`): an
  evaluation state is the weights plus the masks as ``mask/<key>`` entries
  (:meth:`MaskedDenseAlgorithm.evaluation_weights`); without masks the model
  is dense (density 1.0).
* Messages name a masked weight's kept values (float32, row-major order)
  ``kept/<key>`` and its mask (bool: one bit per weight on the channel)
  ``mask/<key>``: :func:`pack_kept`, :func:`unpack_kept`.
"""

from __future__ import annotations

import torch
from torch import nn

from spafl.algorithms.base import ClientData, ClientTask, Message, pack
from spafl.algorithms.dense import DenseAlgorithm
from spafl.algorithms.local_sgd import Hooks, client_optimizer, train_local
from spafl.algorithms.weight_masks import (
    MASKS, Masks, PerWeightMasking, apply_masks_, gather_kept, mask_gradients_, masked_weight_shapes, scatter_kept,
)
from spafl.nn import masked_layers

MASK = MASKS
KEPT = "kept/"


def pack_kept(weights: dict[str, torch.Tensor], masks: Masks, with_masks: bool = True) -> Message:
    """``kept/<key>``: the kept values of each masked weight of ``masks``; with ``with_masks`` also ``mask/<key>``."""
    message = pack(KEPT, gather_kept(weights, masks))
    if with_masks:
        message.update(pack(MASK, masks))
    return message


def unpack_kept(message: Message, masks: Masks) -> dict[str, torch.Tensor]:
    """The weights of ``masks``' keys from the message's ``kept/<key>`` values: kept positions filled, pruned ones 0."""
    values = {key: message[KEPT + key] for key in masks}
    zeros = {key: torch.zeros(mask.shape, dtype=values[key].dtype) for key, mask in masks.items()}
    return scatter_kept(values, masks, zeros)


class MaskedDenseAlgorithm(PerWeightMasking, DenseAlgorithm):
    """Base of the methods that train a dense model under per-weight masks (FedP3, LotteryFL)."""

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        probe = spec.factory()
        #: masked layers in module order, and their weights' state-dict keys and shapes
        self.layer_names = [name for name, _ in masked_layers(probe)]
        self.mask_shapes = masked_weight_shapes(probe)

    def train_masked(self, model: nn.Module, masks: Masks, data: ClientData, task: ClientTask) -> tuple[float, int]:
        """Zero the pruned weights of ``model``, then E local epochs of SGD in which they stay 0; returns (loss, steps)."""
        c = self.config
        apply_masks_(model, masks)
        pruning = {key: mask for key, mask in masks.items() if not bool(mask.all())}
        optimizer = client_optimizer(self._freeze_thresholds(model), c, {}, task.round_index)
        hooks = Hooks(after_gradients=(lambda: mask_gradients_(model, pruning)) if pruning else None)
        return train_local(
            model, data, task, epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
            grad_clip=c.grad_clip, hooks=hooks,
        )

    def dense_flops(self, num_samples: int, extra_forward_samples: int = 0) -> float:
        """Reference training FLOPs at density 1.0 (dense compute), plus forward passes over ``extra_forward_samples`` inputs."""
        return super().dense_flops(num_samples) + extra_forward_samples * float(sum(self.dense_macs.values()))

    @staticmethod
    def evaluation_weights(weights: dict[str, torch.Tensor], masks: Masks | None) -> dict[str, torch.Tensor]:
        """``weights`` with ``masks`` beside them as ``mask/<key>`` entries (what ``evaluate`` expects)."""
        return {**weights, **pack(MASK, masks)} if masks else weights
