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


def assert_equal_with_gradients(ours, reference, our_leaves, reference_leaves, upstream) -> None:
    """Equal values, and equal (and not all-zero) gradients of each leaf pair for the same upstream gradient."""
    assert torch.equal(ours, reference)
    ours.backward(upstream)
    reference.backward(upstream)
    for mine, theirs in zip(our_leaves, reference_leaves, strict=True):
        assert torch.equal(mine.grad, theirs.grad)
        assert mine.grad.count_nonzero() > 0


def copy_leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (4, 6, 5)], ids=["even", "odd", "3d"])
def test_relu_max_pool2x2_equals_max_pool2d_of_relu_bit_for_bit(shape):
    x = integers(*shape).requires_grad_(True)  # about half the windows hold ties
    y = copy_leaf(x)
    reference = F.max_pool2d(F.relu(y), 2)
    upstream = integers(*reference.shape, low=1, high=9, seed=1)
    assert_equal_with_gradients(relu_max_pool2x2(x), reference, [x], [y], upstream)


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
    w, b = copy_leaf(weight), copy_leaf(bias)
    reference = F.conv2d(x, w, b, stride, padding, dilation)
    upstream = integers(*reference.shape, seed=5)
    assert_equal_with_gradients(unfolded_conv2d(x, weight, bias, stride, padding, dilation), reference, [weight, bias], [w, b], upstream)


@pytest.mark.parametrize("size, kernel, padding", [((28, 28), (5, 5), 0), ((13, 11), (3, 4), 1), ((9, 10), (5, 3), 2)])
def test_unfolded_conv_relu_pool_equals_the_composition_with_ties(size, kernel, padding):
    x = integers(5, 2, *size, low=0, high=3, seed=6)  # many zero windows: outputs 0 and ties
    weight = integers(6, 2, *kernel, low=-1, high=2, seed=7).requires_grad_(True)
    w = copy_leaf(weight)
    reference = F.max_pool2d(F.relu(F.conv2d(x, w, padding=padding)), 2)
    upstream = integers(*reference.shape, low=1, high=5, seed=8)
    assert_equal_with_gradients(unfolded_conv_relu_pool2x2(x, weight, (padding, padding)), reference, [weight], [w], upstream)
