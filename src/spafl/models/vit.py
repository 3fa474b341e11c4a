"""Small Vision Transformer with masked attention/MLP linears — SPEC §8, CIFAR-10 ViT column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spafl.nn import MaskedLinear


class PatchEmbedding(nn.Module):
    """Plain (unmasked) patch embedding, as in the reference: a cut into patches and one linear map.

    Cuts ``[B, C, H, W]`` into non-overlapping ``p×p`` patches, flattens each
    patch to a vector of ``patch_dim = p·p·C`` values ordered (row in patch,
    column in patch, channel), then ``Linear(patch_dim, dim)`` (with bias).
    No normalization before or after the projection. Output:
    ``[B, (H/p)·(W/p), dim]``, patches in row-major order.
    """

    def __init__(self, in_channels: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}×{w} is not divisible by patch size {p}")
        x = x.reshape(b, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with masked, bias-free qkv and output projections."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_qkv = MaskedLinear(dim, 3 * inner, bias=False)
        self.to_out = MaskedLinear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, N, dim_head]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    """``MaskedLinear(dim, mlp_dim) → GELU → MaskedLinear(mlp_dim, dim)``, both bias-free."""

    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = MaskedLinear(dim, mlp_dim, bias=False)
        self.fc2 = MaskedLinear(mlp_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer for small images (SPEC §8, **CIFAR-10 ViT** column).

    The reference's masked ViT (``masked_vit`` in ``main/cifar10/model/net.py``
    of the SpaFL code): plain :class:`PatchEmbedding` (cut + one linear), a
    learned class token and learned positional embedding, both drawn from
    N(0, 1) as the reference's ``torch.randn``, ``depth`` pre-norm
    :class:`TransformerBlock` s, class-token pooling, then a LayerNorm and a
    plain ``nn.Linear(dim, num_classes)`` head. No dropout (the reference
    builds it with rate 0).

    Masked (one threshold per output unit, SPEC §2), per block, all without
    bias as the reference's masked linear has none: the qkv projection
    ``dim → 3·heads·dim_head``, the attention output projection
    ``heads·dim_head → dim`` and both MLP linears. With the defaults (dim 128,
    depth 6, heads 8, dim_head 64, mlp 256) that is 1,966,080 masked weights
    and 12,288 thresholds; with the dense parts (patch embedding 6,272, tokens
    8,448, LayerNorms 3,328, head 1,290 for 10 classes) 1,997,706 parameters
    in all, thresholds included. The patch embedding, LayerNorms, tokens and
    head are dense and not counted in density.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 256,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embedding = PatchEmbedding(in_channels, patch_size, dim)
        # N(0, 1) as the reference (torch.randn), drawn in its order: positions, then the class token.
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, dim_head, mlp_dim) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x)
        if tokens.shape[1] + 1 != self.pos_embedding.shape[1]:
            raise ValueError(
                f"got {tokens.shape[1]} patches, the positional embedding has {self.pos_embedding.shape[1] - 1}"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
