"""Output shapes of convolutions, shared by the FLOP count and the fast kernels."""

from __future__ import annotations


def pair(value) -> tuple[int, int]:
    """``k`` -> ``(k, k)``; a pair stays a pair of ints."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Height and width of a conv's output for an input of spatial ``size`` (integer padding)."""
    kernel, stride, padding, dilation = pair(kernel), pair(stride), pair(padding), pair(dilation)
    return tuple(  # type: ignore[return-value]
        (size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in (0, 1)
    )
