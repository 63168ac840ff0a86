"""Attention layers of the U-Net, and what a prompt prepares for them once per sampling run.

`Attention` is multi-head attention with diffusers' parameter names; `TransformerBlock` is
the self-attention, cross-attention and GEGLU feed-forward of a spatial transformer;
`LayoutMap` turns the prompt into a map of where things go. A U-Net's `prepare_context`
gathers the prompt's keys, values and layout maps in a `PreparedContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_attention


class Attention(nn.Module):
    """Multi-head attention of tokens x [B, N, dim] to themselves or to `context` [B, L, cdim].
    `mask` [B, L] bool, True = attend; it broadcasts over heads and queries."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{dim} channels do not split into {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, heads, L, dim / heads] of tokens [B, L, context_dim]."""
        B, L, _ = context.shape
        k = self.to_k(context).view(B, L, self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, L, self.heads, -1).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        keys_values: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """`keys_values`: `self.keys_values(context)`, computed beforehand."""
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = keys_values or self.keys_values(x if context is None else context)
        if cpu_attention.applies(q, k, v):
            h = cpu_attention.attention(q, k, v, mask)
        else:
            h = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask[:, None, None, :]
            )
        return self.to_out[0](h.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is diffusers' (parameterless) dropout: keeps the key `net.2`
        self.net = nn.ModuleList(
            [GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, prepared: PreparedContext) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        kv = prepared.keys_values[self.attn2]
        x = x + self.attn2(self.norm2(x), mask=prepared.mask, keys_values=kv)
        return x + self.ff(self.norm3(x))


class LayoutMap(nn.Module):
    """Where the prompt puts things, before the image shows anything: each place of an
    [H, W] grid (Fourier features of its centre in [-1, 1], so the same at every size) is the
    query of a cross-attention to the prompt's tokens, then a feed-forward layer. Its queries
    do not depend on the noisy image, and `to_image` reads colours off the map, so it can be
    fitted on its own to the data's images at a coarse grid (`layout_fit.pretrain_layout`): what a
    denoiser must predict from pure noise. Each spatial transformer adds the map through its
    own projection, zero at initialisation."""

    def __init__(
        self, dim: int, heads: int, context_dim: int, out_channels: int, frequencies: int = 4
    ):
        super().__init__()
        self.frequencies = frequencies
        self.query = nn.Linear(4 * frequencies, dim)
        self.attn = Attention(dim, heads, context_dim)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.to_image = nn.Linear(dim, out_channels)

    def places(self, height: int, width: int) -> Tensor:
        """[H * W, 4 * frequencies], row-major like the pixels' tokens."""
        device = self.query.weight.device

        def centres(n: int) -> Tensor:
            return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1

        y, x = torch.meshgrid(centres(height), centres(width), indexing="ij")
        freqs = math.pi * 2.0 ** torch.arange(self.frequencies, device=device)
        angles = torch.stack([y, x], dim=-1).reshape(-1, 2, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)

    def forward(self, height: int, width: int, context: Tensor, mask: Tensor | None) -> Tensor:
        """[B, H * W, dim] for context [B, L, context_dim]."""
        q = self.query(self.places(height, width).to(self.query.weight.dtype))
        q = q.expand(context.shape[0], -1, -1)
        h = q + self.attn(q, context.to(q.dtype), mask)
        return h + self.ff(self.norm(h))

    def image(self, height: int, width: int, context: Tensor, mask: Tensor | None) -> Tensor:
        """[B, out_channels, H, W]: the colours the map puts at each place."""
        out = self.to_image(self(height, width, context, mask))
        return out.transpose(1, 2).reshape(len(out), -1, height, width)


class LayoutMaps:
    """A prompt's layout maps as each spatial transformer adds them (its `layout_proj` of the
    map at its grid size): computed at first use, then kept for every call that shares them."""

    def __init__(self, layout: LayoutMap, context: Tensor, mask: Tensor | None):
        self.layout, self.context, self.mask = layout, context, mask
        self.maps: dict[tuple[int, int], Tensor] = {}
        self.projected: dict[tuple[nn.Module, int, int], Tensor] = {}

    def __call__(self, proj: nn.Module, height: int, width: int) -> Tensor:
        if (height, width) not in self.maps:
            self.maps[height, width] = self.layout(height, width, self.context, self.mask)
        if (proj, height, width) not in self.projected:
            self.projected[proj, height, width] = proj(self.maps[height, width])
        return self.projected[proj, height, width]


@dataclass(eq=False)
class PreparedContext:
    """What a U-Net computes from the prompt alone (`UNet.prepare_context`): the same at every
    step of a sampling run, so computed once and passed as `context` to each call."""

    batch_size: int
    keys_values: dict[nn.Module, tuple[Tensor, Tensor]]  # per cross-attention (`attn2`)
    mask: Tensor | None  # [B, L] bool, True = attend
    layout: LayoutMaps | None
    unet: nn.Module = field(repr=False)  # the U-Net it was prepared by, and for
