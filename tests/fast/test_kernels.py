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

from spafl.fast import kernels
from spafl.fast.kernels import relu_max_pool2x2, unfolded_conv2d, unfolded_conv_relu_pool2x2


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


nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="NNPACK does not run on this CPU")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@nnpack
@pytest.mark.parametrize(
    "batch, channels, filters, size, kernel, padding",
    [
        (64, 16, 15, 12, 5, 0),  # LeNet-5's conv2 at steady state: every part by NNPACK
        (5, 4, 3, 9, 5, 2),  # padding
        (8, 6, 7, 10, 3, 1),  # a 3 x 3 kernel (Winograd)
        (3, 8, 5, 20, 5, 0),  # a 16 x 16 output: the weight's gradient by NNPACK up to this size
        (4, 5, 6, 6, 5, 0),  # a 2 x 2 output, smaller than the kernel: the input's gradient by oneDNN
        (3, 4, 2, 22, 5, 0),  # an 18 x 18 output, past NNPACK's kernel limit: the weight's gradient by oneDNN
    ],
)
def test_nnpack_conv2d_and_its_gradients_equal_conv2d_in_float64(one_thread, batch, channels, filters, size, kernel, padding):
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, channels, size, size, generator=generator).requires_grad_()
    weight = (0.1 * torch.randn(filters, channels, kernel, kernel, generator=generator)).requires_grad_()
    assert kernels.nnpack_conv_applies(x, weight, 1, padding, 1, 1)
    out = kernels.conv2d(x, weight, None, 1, padding, 1, 1)
    upstream = torch.randn(out.shape, generator=generator)
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), upstream)

    x64, weight64 = copy_leaf(x.double()), copy_leaf(weight.double())
    expected = F.conv2d(x64, weight64, padding=padding)
    expected_x, expected_weight = torch.autograd.grad(expected, (x64, weight64), upstream.double())
    for got, exact in ((out, expected), (grad_x, expected_x), (grad_weight, expected_weight)):
        assert got.shape == exact.shape and got.dtype == torch.float32
        # oneDNN's float32 conv is off by 1e-6 to 1e-5 of the largest value at these sizes
        torch.testing.assert_close(got.double(), exact.detach(), rtol=0, atol=2e-5 * float(exact.detach().abs().max()))
    # and the backward that the hand-written step calls is the autograd Function's
    by_hand = kernels.nnpack_conv2d_backward(upstream, x.detach(), weight.detach(), padding, True)
    assert torch.equal(by_hand[0], grad_x) and torch.equal(by_hand[1], grad_weight)


@nnpack
def test_nnpack_applies_to_one_thread_float32_stride_one_convs_of_training_batches(one_thread):
    x, weight = torch.zeros(64, 16, 12, 12), torch.zeros(15, 16, 5, 5)
    assert kernels.nnpack_conv_applies(x, weight, 1, 0, 1, 1)
    assert not kernels.nnpack_conv_applies(x, weight, 2, 0, 1, 1)  # stride
    assert not kernels.nnpack_conv_applies(x, weight, 1, 0, 2, 1)  # dilation
    assert not kernels.nnpack_conv_applies(x, weight, 1, "same", 1, 1)
    assert not kernels.nnpack_conv_applies(x, weight, 1, 5, 1, 1)  # padding as large as the kernel
    assert not kernels.nnpack_conv_applies(x.double(), weight.double(), 1, 0, 1, 1)
    assert not kernels.nnpack_conv_applies(x[:, :3], weight[:, :3], 1, 0, 1, 1)  # image channels: oneDNN is faster
    assert not kernels.nnpack_conv_applies(x[:1], weight, 1, 0, 1, 1)
    assert not kernels.nnpack_conv_applies(x[:1].expand(kernels.NNPACK_MAX_BATCH + 1, -1, -1, -1), weight, 1, 0, 1, 1)
    assert not kernels.nnpack_conv_applies(torch.zeros(4, 16, 40, 40), torch.zeros(15, 16, 17, 17), 1, 0, 1, 1)
    torch.set_num_threads(2)  # NNPACK's thread pool is made once, with the threads of its first call
    assert not kernels.nnpack_conv_applies(x, weight, 1, 0, 1, 1)
    x = torch.randn(64, 16, 12, 12)
    assert torch.equal(kernels.conv2d(x, weight, None, 1, 0, 1, 1), F.conv2d(x, weight))  # oneDNN then
