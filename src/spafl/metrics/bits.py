"""Message sizes: the one place where communication is counted (SPEC §7).

A message is a mapping of names to tensors, and each tensor travels in the
encoding its dtype names: ``float32``, ``float16``, ``float64``, the integer
types, and ``bitmask`` for a bool tensor (one bit per element, packed eight
to a byte on the wire). A message's size in bits is the sum over its tensors
of ``numel * bits per element of its encoding``: the payload, without
framing. Both engines count with these functions, on the messages the
algorithm actually built (in-process) or received (Flower, which also
reports the measured bytes on the wire beside them).

An algorithm that sends masks can also report their entropy-coded size
(:func:`entropy_coded_bits`), which an arithmetic coder would approach;
it is reported beside the raw size, never instead of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

GIGA = 1e9

BITMASK = "bitmask"

#: Bits per element of each encoding.
ENCODING_BITS = {
    "float64": 64, "float32": 32, "float16": 16, "bfloat16": 16,
    "int64": 64, "int32": 32, "int16": 16, "int8": 8, "uint8": 8,
    BITMASK: 1,
}


def encoding_of(dtype: torch.dtype | str) -> str:
    """The encoding a tensor of ``dtype`` travels in (a torch dtype or a NumPy dtype name)."""
    name = str(dtype).removeprefix("torch.")
    if name == "bool":
        return BITMASK
    if name not in ENCODING_BITS:
        raise ValueError(f"dtype {name} has no encoding on the channel; allowed: bool, {', '.join(ENCODING_BITS)}")
    return name


def encoded_bits(numel: int, encoding: str) -> int:
    """Bits of ``numel`` elements in ``encoding``."""
    return int(numel) * ENCODING_BITS[encoding]


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype`` on the channel (a bool is one bit: it travels in a bitmask)."""
    return ENCODING_BITS[encoding_of(dtype)]


def message_bits(message: Mapping[str, torch.Tensor] | None) -> int:
    """Payload bits of one message: sum of numel x encoding bits over its named tensors."""
    if not message:
        return 0
    return sum(encoded_bits(tensor.numel(), encoding_of(tensor.dtype)) for tensor in message.values())


def entropy_coded_bits(mask: torch.Tensor) -> int:
    """Size of a 0/1 mask under an ideal entropy coder: ``H(p) * n + log2(n)`` bits, rounded up.

    ``p`` is the mask's fraction of ones and ``H`` the binary entropy; the
    ``log2(n)`` bits send the count of ones. This is how FedPM's authors
    count their uplink.
    """
    n = mask.numel()
    if n == 0:
        return 0
    p = float(mask.to(torch.float64).mean())
    entropy = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return math.ceil(entropy * n + math.log2(n))


def coded_message_bits(message: Mapping[str, torch.Tensor] | None) -> int:
    """Bits of a message whose bitmasks are entropy-coded (other tensors as :func:`message_bits`)."""
    if not message:
        return 0
    return sum(
        entropy_coded_bits(tensor) if tensor.dtype == torch.bool else encoded_bits(tensor.numel(), encoding_of(tensor.dtype))
        for tensor in message.values()
    )
