"""CPU kernels for compact execution, built from PyTorch ops that run fast on small maps.

On a small CPU, three things dominate LeNet-5-sized training steps: a
convolution with a small fan-in (the first layer: one or three image
channels), ``max_pool2d``, and element-wise ops on stride-2 views. Each
kernel here computes exactly what the plain PyTorch composition computes:

* :func:`relu_max_pool2x2`: ``max_pool2d(relu(x), 2)``, bit-identical values
  and gradients;
* :func:`unfolded_conv2d`: ``conv2d`` as one matrix product with the
  unfolded input windows (equal up to float summation order);
* :func:`unfolded_conv_relu_pool2x2`: a conv with 2 x 2 pooling after it,
  for an input that needs no gradient (an image batch), as one matrix
  product of the weight, laid out once per corner of the pooling windows,
  with contiguous rows of the input, so the windows are never unfolded (for
  LeNet-5's first layer that copy alone wrote 3.7 MB per batch).

Measured figures are in ``benchmarks/README.md`` (``sparse_step.py``).

Layout: unfolded windows are a ``[C*kh*kw, positions*N]`` matrix whose columns
run over the batch fastest, so unfolding copies runs of N contiguous values
and a matrix product gives ``[out_channels, positions, N]``.
:func:`unfolded_conv2d` returns an ``[N, C, H, W]`` view of that memory
(PyTorch's ops accept any strides); the fused conv copies its pooled output
into ``[N, C, H, W]`` memory, on which the next (oneDNN) conv runs faster.

PyTorch's comparisons into ``bool`` tensors and ``masked_fill`` are several
times slower on CPU than float arithmetic, so 0/1 indicators are written
into float tensors (``torch.eq(a, b, out=float_tensor)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from spafl.nn.shapes import conv_output_size, pair as _pair


def _windows(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation) -> tuple[torch.Tensor, int, int]:
    """``x``'s conv windows as a ``[C*kh*kw, oh*ow*N]`` matrix (columns: output row, output column, sample), and oh, ow."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = kernel
    oh, ow = conv_output_size(x.shape[-2:], kernel, stride, padding, dilation)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, channels, height, width = x.shape
    batch_last = x.permute(1, 2, 3, 0).contiguous()  # [C, H, W, N]
    row, col = width * n, n
    size = (channels, kh, kw, oh, ow, n)
    strides = (height * row, dh * row, dw * col, sh * row, sw * col, 1)
    return batch_last.as_strided(size, strides).reshape(channels * kh * kw, -1), oh, ow


def _pooled_blocks(x: torch.Tensor, kernel: tuple[int, int], padding) -> tuple[torch.Tensor, int, int, int]:
    """The input of a stride-1 conv followed by 2 x 2 pooling, as ``[C*(kh+1)*span_w, h*w*N]`` rows; and h, w, span_w.

    Row ``(c, t, s)`` holds ``x[n, c, 2i + t, 2j + s]`` in column ``(i, j, n)``
    (``t < kh + 1``, ``s < span_w``, an even width of at least ``kw + 1``).
    The conv output at corner (a, b) of every pooling window, ``2i + a, 2j + b``,
    is then the product of these rows with a weight laid out the same way and
    shifted by (a, b): ``W[f, c, t - a, s - b]`` at row ``(c, t, s)``, zero
    where that is no window element. No row per window element is ever
    copied out. Built in two copies that move runs of N contiguous values:
    split the columns by parity (batch last), then gather every (row offset,
    column offset) block once.
    """
    kh, kw = kernel
    ph, pw = _pair(padding)
    n, channels, height, width = x.shape
    oh, ow = conv_output_size((height, width), kernel, 1, padding, 1)
    h, w = oh // 2, ow // 2
    spans = (kw + 2) // 2  # column offsets s = b + kj = 2 * v + p with v < spans, p in {0, 1}
    half = w + spans - 1  # columns per parity that the blocks read
    x = F.pad(x, (pw, 2 * half - width - pw, ph, ph))  # a negative pad crops unread columns
    rows = x.shape[2]
    split = x.view(n, channels, rows, half, 2).permute(1, 2, 4, 3, 0).contiguous()  # [C, H, parity, W/2, N]
    s_c, s_r, s_p, s_v = split.stride()[:4]
    blocks = split.as_strided(
        (channels, kh + 1, spans, 2, h, w, n), (s_c, s_r, s_v, s_p, 2 * s_r, s_v, 1)
    ).reshape(channels * (kh + 1) * 2 * spans, h * w * n)  # [C, row offset, column offset, h*w*N]
    return blocks, h, w, 2 * spans


def unfolded_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation)`` (groups 1) as one matrix product.

    For a small fan-in (a first layer over one to three image channels) this
    is several times faster on CPU than PyTorch's convolution, forward and
    weight gradient alike. ``x`` gets no gradient: use it where it needs none.
    """
    n = x.shape[0]
    out_channels = weight.shape[0]
    windows, oh, ow = _windows(x.detach(), tuple(weight.shape[2:]), stride, padding, dilation)
    out = (weight.reshape(out_channels, -1) @ windows).view(out_channels, oh, ow, n).permute(3, 0, 1, 2)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def conv_relu_pool2x2_forward(x: torch.Tensor, weight: torch.Tensor, padding) -> tuple[torch.Tensor, tuple]:
    """:func:`unfolded_conv_relu_pool2x2`'s value, and what :func:`conv_relu_pool2x2_backward` needs."""
    n, k, channels, kh, kw = x.shape[0], *weight.shape
    blocks, h, w, span_w = _pooled_blocks(x, (kh, kw), padding)
    # per pooling corner (a, b), the weight laid out like the blocks' rows, shifted by (a, b), zero where no window element is
    laid_out = weight.new_zeros(4, k, channels, kh + 1, span_w)
    for corner, (a, b) in enumerate(_CORNERS):
        laid_out[corner, :, :, a : a + kh, b : b + kw] = weight
    # one product for the four corners reads the blocks once: [4*k, rows] @ [rows, h*w*N]
    out = torch.mm(laid_out.view(4 * k, -1), blocks).view(4, k, h, w, n)
    top = torch.amax(out, 0)  # one pass; three maximum() of pairs take 1.6 times as long
    # [N, C, H, W] memory: LeNet-5's conv2 (oneDNN) takes 1.0 ms on it against 1.4 ms on the batch-last view
    pooled = torch.clamp_min(top.permute(3, 0, 1, 2), 0, out=top.new_empty(n, k, h, w))
    return pooled, (blocks, out, top, weight.shape, span_w)


def conv_relu_pool2x2_backward(saved: tuple, grad: torch.Tensor) -> torch.Tensor:
    """The weight's gradient of :func:`unfolded_conv_relu_pool2x2`, from ``grad`` at its output."""
    blocks, out, top, (k, channels, kh, kw), span_w = saved
    grad_out = torch.empty_like(out)
    _route_to_first_maximum(grad.permute(1, 2, 3, 0), out.unbind(0), top, grad_out.unbind(0))
    # one product for the four corners, [rows, h*w*N] @ [h*w*N, 4*k]: inside a LeNet-5 step 0.9 ms against
    # 1.2-2.0 ms for four products over shifted rows, which read the blocks four times
    by_row = torch.mm(blocks, grad_out.view(4 * k, -1).t()).t().view(4, k, channels, kh + 1, span_w)
    grad_weight = by_row[0, :, :, :kh, :kw].clone()
    for corner, (a, b) in enumerate(_CORNERS[1:], start=1):
        grad_weight += by_row[corner, :, :, a : a + kh, b : b + kw]
    return grad_weight


#: The corners (row, column) of a 2 x 2 pooling window, in the window's row-major order.
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


class _ConvReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, padding):  # type: ignore[override]
        out, ctx.saved = conv_relu_pool2x2_forward(x, weight, padding)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        grad_weight = conv_relu_pool2x2_backward(ctx.saved, grad)
        del ctx.saved
        return None, grad_weight, None


def unfolded_conv_relu_pool2x2(x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, weight, padding=padding)), 2)`` (stride 1, dilation 1) for an ``x`` that needs no gradient.

    Values and the weight's gradient equal the composition up to float
    summation order (the matrix product, see :func:`_pooled_blocks`); the
    pooling and its gradient are those of :func:`relu_max_pool2x2`.
    """
    return _ConvReluPool.apply(x.detach(), weight, padding)


def _route_to_first_maximum(grad, corners, top, routed) -> None:
    """Write into ``routed`` the gradients of the four ``corners`` of ``relu(max(corners))``, as ``max_pool2d(relu(.))`` gives them.

    A window's gradient goes to its first corner equal to the maximum (the
    order of ``corners`` is the windows' row-major order), and nowhere when
    the maximum is <= 0, where ReLU passes nothing.

    The last corner's share is what the others leave: some corner equals
    the maximum, so a gradient that no earlier corner took is the last one's.
    """
    indicator = torch.empty_like(top)
    remaining = routed[-1]  # the gradient no corner has taken yet; at the end, the last corner's share
    torch.mul(grad, torch.gt(top, 0, out=indicator), out=remaining)
    for corner, routed_corner in zip(corners[:-1], routed[:-1]):
        torch.mul(remaining, torch.eq(corner, top, out=indicator), out=routed_corner)
        remaining -= routed_corner  # exactly 0 where this corner took the gradient


def relu_max_pool2x2_forward(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """:func:`relu_max_pool2x2`'s value, and what :func:`relu_max_pool2x2_backward` needs."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    windows = x[..., : 2 * h, : 2 * w].unflatten(-1, (w, 2)).unflatten(-3, (h, 2))  # [..., h, 2, w, 2]
    corners = windows.movedim((-3, -1), (0, 1)).reshape(4, *x.shape[:-2], h, w)  # one strided copy
    top = torch.amax(corners, 0)
    return top.clamp_min(0), (corners, top, x.shape)


def relu_max_pool2x2_backward(saved: tuple, grad: torch.Tensor) -> torch.Tensor:
    """The input's gradient of :func:`relu_max_pool2x2`, from ``grad`` at its output."""
    corners, top, input_shape = saved
    routed = torch.empty_like(corners)  # [4, ..., h, w]
    _route_to_first_maximum(grad, corners.unbind(0), top, routed.unbind(0))
    h, w = top.shape[-2:]
    lead = top.shape[:-2]
    grad_windows = routed.view(2, 2, *lead, h, w).movedim((0, 1), (-3, -1)).reshape(*lead, 2 * h, 2 * w)
    if grad_windows.shape == input_shape:
        return grad_windows
    grad_x = grad.new_zeros(input_shape)
    grad_x[..., : 2 * h, : 2 * w] = grad_windows
    return grad_x


class _ReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        out, ctx.saved = relu_max_pool2x2_forward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        grad_x = relu_max_pool2x2_backward(ctx.saved, grad)
        del ctx.saved
        return grad_x


def relu_max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(x), 2)``, with bit-identical values and gradients.

    ReLU after the maximum equals the maximum after ReLU, and neither rounds.
    Each window's gradient goes to its first maximum in row-major order, as
    in ``max_pool2d``, and nowhere when the maximum is <= 0. The four window
    corners are copied apart once; every other op runs on contiguous memory
    (PyTorch's CPU ``max_pool2d`` and element-wise ops on stride-2 views are
    slow on many small maps).
    """
    return _ReluMaxPool.apply(x)


# -- convolutions by NNPACK's Fourier-transform kernels --------------------------------------------------------------
#
# PyTorch ships NNPACK but calls it only with oneDNN off. On one thread and a
# training batch, NNPACK's FFT-based convolution takes 0.35-0.75 of oneDNN's
# time for the inner convs of LeNet-5 and Conv4 (benchmarks/README.md).
# PyTorch has no NNPACK gradients, but both are NNPACK forwards:
# the input's gradient is the output gradient correlated with the flipped,
# transposed weight (padding k - 1 - p); the weight's gradient is the input,
# batch and channels swapped, correlated with the output gradient, batch and
# channels swapped, as kernel. Values are those of conv2d up to float
# rounding (closer to the exact result than oneDNN's, in our measurements).

#: Largest batch computed by NNPACK: from 512 samples its transforms outgrow the cache and oneDNN is faster.
NNPACK_MAX_BATCH = 256
#: Fewest input channels computed by NNPACK: over one to three image channels oneDNN is faster.
NNPACK_MIN_CHANNELS = 4
#: NNPACK's largest kernel height and width.
_NNPACK_MAX_KERNEL = 16

_nnpack_ready: bool | None = None


def _nnpack_initialized() -> bool:
    """Whether NNPACK runs on this machine (initialized on the first call)."""
    global _nnpack_ready
    if _nnpack_ready is None:
        _nnpack_ready = bool(torch.backends.nnpack.is_available())
    return _nnpack_ready


def nnpack_conv_applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether :func:`conv2d` computes this conv with NNPACK: one thread, float32 on CPU, stride 1, no dilation or groups, a training-sized batch.

    One thread only: PyTorch creates NNPACK's thread pool once, with the
    threads set at its first call, and a pool of one thread starts no thread
    that a forked worker would lack.
    """
    if isinstance(padding, str) or x.dim() != 4 or groups != 1 or _pair(stride) != (1, 1) or _pair(dilation) != (1, 1):
        return False
    kernel = weight.shape[2:]
    return (
        x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
        and 2 <= x.shape[0] <= NNPACK_MAX_BATCH and x.shape[1] >= NNPACK_MIN_CHANNELS
        and max(kernel) <= _NNPACK_MAX_KERNEL and all(p < k for p, k in zip(_pair(padding), kernel))
        and torch.get_num_threads() == 1 and _nnpack_initialized()
    )


def _nnpack(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    # NNPACK reads the weight's memory as contiguous
    return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), None, list(padding), [1, 1])


def nnpack_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    """``conv2d(x, weight, padding=padding)`` by NNPACK, where :func:`nnpack_conv_applies`."""
    return _nnpack(x, weight, _pair(padding))


def nnpack_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding, input_needs_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The input's (if needed) and the weight's gradient of :func:`nnpack_conv2d_forward`, from ``grad`` at its output.

    By NNPACK where that is faster: the input's gradient where the output is
    at least the kernel's size (else the padded gradient is mostly zeros),
    the weight's where the output fits NNPACK's kernel limit; by oneDNN otherwise.
    """
    padding = _pair(padding)
    (kh, kw), (oh, ow) = weight.shape[2:], grad.shape[2:]
    by_nnpack_input = input_needs_grad and oh >= kh and ow >= kw
    by_nnpack_weight = max(oh, ow) <= _NNPACK_MAX_KERNEL
    grad_x = grad_weight = None
    if (input_needs_grad and not by_nnpack_input) or not by_nnpack_weight:
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], 1,
            [input_needs_grad and not by_nnpack_input, not by_nnpack_weight, False],
        )
    if by_nnpack_input:
        flipped = weight.flip(2, 3).transpose(0, 1)  # [C, K, kh, kw]
        grad_x = _nnpack(grad, flipped, (kh - 1 - padding[0], kw - 1 - padding[1]))
    if by_nnpack_weight:
        grad_weight = _nnpack(x.transpose(0, 1), grad.transpose(0, 1), padding).transpose(0, 1).contiguous()
    return grad_x, grad_weight


class _NNPackConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return nnpack_conv2d_forward(x, weight, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = nnpack_conv2d_backward(grad, x, weight, ctx.padding, ctx.needs_input_grad[0])
        return grad_x, grad_weight, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> torch.Tensor:
    """``F.conv2d``, by NNPACK where :func:`nnpack_conv_applies` (values equal up to float rounding).

    Values and gradients are those of :func:`conv2d_forward` and :func:`conv2d_backward`.
    """
    if not nnpack_conv_applies(x, weight, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out = _NNPackConv.apply(x, weight, _pair(padding))
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> tuple[torch.Tensor, bool]:
    """:func:`conv2d`'s value without bias or autograd, and whether NNPACK computed it (for :func:`conv2d_backward`)."""
    if nnpack_conv_applies(x, weight, stride, padding, dilation, groups):
        return nnpack_conv2d_forward(x, weight, padding), True
    return F.conv2d(x, weight, None, stride, padding, dilation, groups), False


def conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
    input_needs_grad: bool, by_nnpack: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The input's (if needed) and the weight's gradient of :func:`conv2d_forward`, as autograd computes them for :func:`conv2d`."""
    if by_nnpack:
        return nnpack_conv2d_backward(grad, x, weight, padding, input_needs_grad)
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [input_needs_grad, True, False]
    )
    return grad_x, grad_weight
