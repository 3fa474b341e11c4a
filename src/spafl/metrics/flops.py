"""Training FLOPs as the SpaFL reference counts them (SPEC §7).

Per client per round::

    forward   = E * |D_k| * sum_l density_l * dense_macs_l
    backward  = 2 * forward
    threshold = (#thresholds) * (#batches) + (#masked weights)

``dense_macs_l`` is the multiply-accumulate count of masked layer l for one
sample: ``out * in/groups * kh * kw * H_out * W_out`` for a conv and
``in * out`` per position for a linear (times the number of tokens for a
ViT's linears; 1 for LeNet-5/Conv4). Only masked layers are counted, each at
its density at the end of the client's local training; pruned *input*
channels are ignored, so compact compute is lower than this figure. The
paper-comparable run figure is the sum over rounds and sampled clients,
divided by the number of clients N.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spafl.nn import masked_layers
from spafl.nn.shapes import conv_output_size


def _conv_output_size(conv: nn.Conv2d, size) -> tuple[int, int]:
    """Height and width of ``conv``'s output for an input of spatial ``size``."""
    if conv.padding == "same":
        return tuple(size)  # type: ignore[return-value]
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    return conv_output_size(size, conv.kernel_size, conv.stride, padding, conv.dilation)


@torch.no_grad()
def dense_macs_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of each masked layer for one input of ``input_shape`` (C, H, W)."""
    macs: dict[str, int] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            weight = module.weight
            per_output = weight[0].numel()  # incoming weights of one unit
            if isinstance(module, nn.Conv2d):  # its output may already be pooled (relu_pool)
                positions = math.prod(_conv_output_size(module, inputs[0].shape[-2:]))
                outputs_per_sample = module.out_channels * positions
            else:
                outputs_per_sample = output[0].numel()  # units x positions for one sample
            macs[name] = int(per_output * outputs_per_sample)

        return hook

    for name, layer in masked_layers(model):
        hooks.append(layer.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    guards = {name: layer.collapse_guard for name, layer in masked_layers(model)}
    kept = {name: layer.kept_fraction.clone() for name, layer in masked_layers(model)}
    try:
        for _, layer in masked_layers(model):
            layer.collapse_guard = False  # measuring must not change thresholds
        device = next(model.parameters()).device
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
        for name, layer in masked_layers(model):
            layer.collapse_guard = guards[name]
            layer.kept_fraction.copy_(kept[name])
        model.train(was_training)
    return macs


def training_flops(
    dense_macs: dict[str, int],
    layer_density: dict[str, float],
    num_samples: int,
    local_epochs: int,
    num_batches: int,
    num_thresholds: int,
    num_masked_weights: int,
) -> float:
    """The reference's training FLOPs of one client in one round."""
    forward = local_epochs * num_samples * sum(layer_density[name] * macs for name, macs in dense_macs.items())
    return 3.0 * forward + num_thresholds * num_batches + num_masked_weights


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)
