"""ViT-Small (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; the Small size of
Touvron et al., "Training data-efficient image transformers", ICML 2021): 12 pre-norm blocks of
6-head self-attention at width 384 with a 4x MLP, a class token, learned position embeddings and
stochastic depth rising to 0.1.

The patch size is chosen for the image: the largest power of two up to 16 that leaves at least 7
patches a side (224 -> 16, as ViT-S/16; 64 -> 8; 32 and 28 -> 4; 8 -> 1). Pixels beyond the
last whole patch are not seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import DropPath, Width


def patch_size_for(image_size: int) -> int:
    """The ViT patch size for `image_size` (see the module docstring)."""
    for patch in (16, 8, 4, 2):
        if image_size // patch >= 7:
            return patch
    return 1


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = DropPath(drop)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, dim: int = 384, depth: int = 12,
                 heads: int = 6, drop_path: float = 0.1) -> None:
        super().__init__()
        patch = patch_size_for(image_size)
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, drop_path * i / max(1, depth - 1)) for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("vit-small")
def vit_small(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """ViT-S (Dosovitskiy et al. 2021, DeiT-S size): patch size chosen for the image; `width` scales the 64-wide heads."""
    heads = 6
    return VisionTransformer(num_classes, in_channels, image_size, dim=heads * max(2, int(round(64 * width))),
                             heads=heads)
