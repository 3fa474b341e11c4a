"""Turning uint8 image batches into model input, on whole batch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spafl.errors import UserError

PIXELS: tuple[str, ...] = ("raw", "normalized")
CROP_PADDING = 4

# Per-channel mean / std of the training images, in [0, 1] units.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # synthetic images are prototype + noise, roughly uniform on [0, 255].
    "synthetic": ((0.5,), (0.29,)),
}


def draw_crop_flip(
    batch: int, padding: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random crop offsets (row, col) in ``0..2*padding`` and horizontal-flip flags."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=gen_device)
    flip = torch.randint(0, 2, (batch,), generator=generator, device=gen_device).bool()
    return offsets[0].to(device), offsets[1].to(device), flip.to(device)


def crop_flip(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``x`` [B, C, H, W] by ``padding`` on each side, take the H×W window at (rows[b], cols[b]),
    and mirror it left-right where ``flip[b]``. One gather for the whole batch."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    r = rows.view(b, 1) + torch.arange(h, device=x.device)  # [B, H]
    col_range = torch.arange(w, device=x.device)
    col_range = torch.where(flip.view(b, 1), col_range.flip(0), col_range)  # [B, W]
    cc = cols.view(b, 1) + col_range
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, r.view(b, 1, h, 1), cc.view(b, 1, 1, w)]


@dataclass(frozen=True)
class Preprocess:
    """uint8 ``[B, C, H, W]`` -> float32 model input.

    ``pixels="raw"``: float values 0..255, no scaling (what the FMNIST
    reference feeds). ``pixels="normalized"``: divide by 255, then per channel
    ``(x - mean) / std``. ``augment``: pad-4 random crop + random horizontal
    flip, applied only when called with ``train=True``; its randomness comes
    only from ``generator`` (torch's default generator when None).
    """

    pixels: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    def __post_init__(self) -> None:
        if self.pixels not in PIXELS:
            raise UserError(f"pixels must be one of {', '.join(PIXELS)}, got {self.pixels!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise UserError(f"mean and std need one value per channel, got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise UserError(f"std values must be > 0, got {self.std}")

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None, train: bool = False) -> torch.Tensor:
        x = x_uint8
        if x.dtype == torch.float32:
            if train and self.augment:
                raise ValueError("augmentation needs uint8 images; float features are used as given")
            return x  # a user's own features (spafl.api.run): no scaling
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"Preprocess expects a uint8 [B, C, H, W] batch, got {x.dtype} {tuple(x.shape)}")
        if train and self.augment and x.shape[0] > 0:
            rows, cols, flip = draw_crop_flip(x.shape[0], CROP_PADDING, generator, x.device)
            x = crop_flip(x, rows, cols, flip, CROP_PADDING)
        x = x.to(torch.float32)
        if self.pixels == "raw":
            return x.contiguous()
        c = x.shape[1]
        if len(self.mean) not in (1, c):
            raise ValueError(f"Preprocess has {len(self.mean)} channel statistics but the batch has {c} channels")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return ((x / 255.0 - mean) / std).contiguous()


def preprocess_for(dataset_name: str, pixels: str, augment: bool | None = None) -> Preprocess:
    """The preprocessing for a dataset: its channel statistics; augmentation on by default for CIFAR."""
    if dataset_name not in STATS:
        raise UserError(f"unknown dataset {dataset_name!r}; choose one of: {', '.join(STATS)}")
    if pixels not in PIXELS:
        raise UserError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
    if augment is None:
        augment = dataset_name in ("cifar10", "cifar100")
    mean, std = STATS[dataset_name]
    return Preprocess(pixels=pixels, mean=mean, std=std, augment=bool(augment))
