"""The subject encoder's trainable part: a Q-Former (Li et al. 2023, BLIP-2).

A fixed set of learned queries attends to itself and to the frozen CLIP vision
tokens (last layer, before pooling); each query comes out as one subject token.
The number of queries is the number of nested keys/values (paper: 1024 for
faces, 256 for pets). Output width = the UNet's context width, so each layer's
nested projections can start as copies of its own to_k / to_v.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, *, dim: int, heads: int, operations=nn):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Q-Former width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = operations.Linear(dim, dim, bias=False)
        self.to_k = operations.Linear(dim, dim, bias=False)
        self.to_v = operations.Linear(dim, dim, bias=False)
        self.to_out = operations.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # [b,h,n,d]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class QFormerBlock(nn.Module):
    """Pre-norm: self-attention among queries, cross-attention to the image, MLP."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: int = 4, operations=nn):
        super().__init__()
        self.norm_self = operations.LayerNorm(dim)
        self.self_attn = Attention(dim=dim, heads=heads, operations=operations)
        self.norm_cross = operations.LayerNorm(dim)
        self.norm_image = operations.LayerNorm(dim)
        self.cross_attn = Attention(dim=dim, heads=heads, operations=operations)
        self.norm_mlp = operations.LayerNorm(dim)
        self.mlp = nn.Sequential(
            operations.Linear(dim, dim * mlp_ratio), nn.GELU(), operations.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross(x), self.norm_image(image))
        return x + self.mlp(self.norm_mlp(x))


class QFormer(nn.Module):
    def __init__(self, *, vision_dim: int, num_queries: int, dim: int, depth: int, heads: int, out_dim: int, operations=nn):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.proj_in = operations.Linear(vision_dim, dim)
        self.blocks = nn.ModuleList(QFormerBlock(dim=dim, heads=heads, operations=operations) for _ in range(depth))
        self.norm_out = operations.LayerNorm(dim)
        self.proj_out = operations.Linear(dim, out_dim)

    def forward(self, image_tokens: Tensor) -> Tensor:
        """CLIP vision tokens [B, N, vision_dim] -> subject tokens [B, num_queries, out_dim]."""
        image = self.proj_in(image_tokens)  # [b, N, dim]
        x = self.queries.to(image.dtype).expand(image.shape[0], -1, -1)  # [b, Q, dim]
        for block in self.blocks:
            x = block(x, image)
        return self.proj_out(self.norm_out(x))
