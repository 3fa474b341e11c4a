"""Training FLOPs as the SpaFL reference counts them (SPEC §7).

Per client per round::

    forward   = E * |D_k| * sum_l density_l * dense_macs_l
    backward  = 2 * forward
    threshold = (#thresholds) * (#batches) + (#masked weights)

``dense_macs_l`` is the multiply-accumulate count of masked layer l for one
sample, in one of two counts (:func:`dense_macs_per_sample`):

* ``"paper"`` (the default, and what goes into a run's ``flops_cum``): the
  reference's own formula (``FLOP_count_weight`` in the SpaFL code's
  ``client/Client_Class.py``): ``out * in/groups * kh * kw * H_out * W_out``
  for a conv and ``in * out`` for a linear, whatever number of positions the
  linear is applied at. This is the figure comparable with the paper's tables.
* ``"true"``: the same for convs, and ``in * out`` times the positions a
  linear is applied at, for a ViT the 65 tokens (64 patches and the class
  token) of a 32×32 image with 4×4 patches. For LeNet-5, Conv4 and the
  ResNet-18 variant, whose linears see one position, both counts are equal;
  for the ViT every masked layer's true count is 65 times the paper's.

The threshold term is the CIFAR-10 reference's; its CIFAR-100 code never adds
it (a few million per client and round, beside 1.5·10^12 for the ResNet-18
variant's forward and backward at density 1 over 500 samples and 7 epochs).

Only masked layers are counted, each at its density at the end of the
client's local training; pruned *input* channels are ignored, so compact
compute is lower than either figure. Neither counts what no masked layer
computes (a ViT's attention products ``q @ k^T`` and ``attn @ v``, its patch
embedding and head, normalization). The paper-comparable run figure is the
sum over rounds and sampled clients, divided by the number of clients N.
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


#: The two counts :func:`dense_macs_per_sample` knows (see the module docstring).
MAC_COUNTS = ("paper", "true")


@torch.no_grad()
def dense_macs_per_sample(model: nn.Module, input_shape: tuple[int, ...], count: str = "paper") -> dict[str, int]:
    """Multiply-accumulates of each masked layer for one input of ``input_shape`` (C, H, W).

    ``count="paper"``: a linear counts ``in * out`` once per sample, as the
    reference's formula; ``count="true"``: times the positions it is applied
    at (a ViT's tokens). Convs count every output position in both.
    """
    if count not in MAC_COUNTS:
        raise ValueError(f"count must be one of {', '.join(MAC_COUNTS)}; got {count!r}")
    macs: dict[str, int] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            weight = module.weight
            per_output = weight[0].numel()  # incoming weights of one unit
            if isinstance(module, nn.Conv2d):  # its output may already be pooled (relu_pool)
                positions = math.prod(_conv_output_size(module, inputs[0].shape[-2:]))
                outputs_per_sample = module.out_channels * positions
            elif count == "paper":
                outputs_per_sample = weight.shape[0]  # the reference: in * out, once per sample
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
