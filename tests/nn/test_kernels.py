"""The compact-execution kernels compute what the plain PyTorch compositions compute.

Integer-valued inputs and weights in float64 make every product and sum exact,
so the conv outputs are exact integers with many ties inside pooling windows:
values and gradients must then be *equal*, not close, and a tie must send
the gradient where ``max_pool2d`` sends it (the first maximum of the window).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spafl.nn.kernels import relu_max_pool2x2, unfolded_conv2d, unfolded_conv_relu_pool2x2


def integers(*shape, low=-2, high=3, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=generator).double()


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (4, 6, 5)], ids=["even", "odd", "3d"])
def test_relu_max_pool2x2_equals_max_pool2d_of_relu_bit_for_bit(shape):
    x = integers(*shape).requires_grad_(True)  # about half the windows hold ties
    y = x.detach().clone().requires_grad_(True)
    ours, reference = relu_max_pool2x2(x), F.max_pool2d(F.relu(y), 2)
    assert torch.equal(ours, reference)
    upstream = integers(*reference.shape, low=1, high=9, seed=1)
    ours.backward(upstream)
    reference.backward(upstream)
    assert torch.equal(x.grad, y.grad)
    assert x.grad.count_nonzero() > 0


def test_relu_max_pool2x2_routes_a_tie_to_the_first_corner_and_nothing_below_zero():
    x = torch.tensor([[[3.0, 3.0], [3.0, 1.0]], [[-1.0, -2.0], [-1.0, -3.0]], [[0.0, 2.0], [5.0, 5.0]]]).requires_grad_(True)
    out = relu_max_pool2x2(x)
    assert out.flatten().tolist() == [3.0, 0.0, 5.0]
    out.backward(torch.tensor([[[10.0]], [[20.0]], [[30.0]]]))
    assert x.grad.tolist() == [[[10.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [30.0, 0.0]]]


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((1, 2), (0, 1), 1)])
def test_unfolded_conv2d_equals_conv2d(stride, padding, dilation):
    x = integers(3, 2, 9, 11, seed=2)
    weight = integers(4, 2, 3, 3, seed=3).requires_grad_(True)
    bias = integers(4, seed=4).requires_grad_(True)
    ours = unfolded_conv2d(x, weight, bias, stride, padding, dilation)
    reference = F.conv2d(x, weight.detach(), bias.detach(), stride, padding, dilation)
    assert torch.equal(ours, reference)
    upstream = integers(*reference.shape, seed=5)
    ours.backward(upstream)
    w, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    F.conv2d(x, w, b, stride, padding, dilation).backward(upstream)
    assert torch.equal(weight.grad, w.grad) and torch.equal(bias.grad, b.grad)


@pytest.mark.parametrize("size, kernel, padding", [((28, 28), (5, 5), 0), ((13, 11), (3, 4), 1), ((9, 10), (5, 3), 2)])
def test_unfolded_conv_relu_pool_equals_the_composition_with_ties(size, kernel, padding):
    x = integers(5, 2, *size, low=0, high=3, seed=6)  # many zero windows: outputs 0 and ties
    weight = integers(6, 2, *kernel, low=-1, high=2, seed=7).requires_grad_(True)
    ours = unfolded_conv_relu_pool2x2(x, weight, (padding, padding))
    w = weight.detach().clone().requires_grad_(True)
    reference = F.max_pool2d(F.relu(F.conv2d(x, w, padding=padding)), 2)
    assert torch.equal(ours, reference)
    upstream = integers(*reference.shape, low=1, high=5, seed=8)
    ours.backward(upstream)
    reference.backward(upstream)
    assert torch.equal(weight.grad, w.grad)
    assert weight.grad.count_nonzero() > 0
