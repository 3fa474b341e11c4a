"""Message sizes: the one place where communication is counted (SPEC §7).

A message is a mapping of names to tensors. Its size in bits is the sum over
its tensors of ``numel * bits per element of its dtype`` — exactly what is
serialized as payload, with no framing. Every engine counts bits with
:func:`message_bits` on the messages the algorithm actually built.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

GIGA = 1e9


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype`` (bool counts as 8: torch stores it in a byte)."""
    return torch.empty((), dtype=dtype).element_size() * 8


def message_bits(message: Mapping[str, torch.Tensor] | None) -> int:
    """Payload bits of one message: sum of numel x dtype bits over its named tensors."""
    if not message:
        return 0
    return sum(tensor.numel() * dtype_bits(tensor.dtype) for tensor in message.values())
