"""A diffusion transformer (Peebles & Xie 2023): the image cut into patches of 2 or 4 pixels,
tokens with 2-D sin-cos positions, transformer blocks modulated by the timestep, patches back.

Two layouts, each with the parameter names of its diffusers class, so that its checkpoints load
(tests/test_dit.py checks the outputs against diffusers' on tiny random models):

- unconditional or class-conditional (`context_dim` None): `DiTTransformer2DModel`. Every
  block has adaLN-Zero: its own timestep (+ class) embedding, from which a linear layer makes
  the shift, scale and gate of its attention and feed-forward branches.
- text-conditioned (`context_dim` set): `PixArtTransformer2DModel`. One timestep embedding
  (adaLN-single) makes the six modulations once, each block adds its learnt table; between
  self-attention and feed-forward, cross-attention to the projected text tokens.

Initialised as adaLN-Zero prescribes: every residual branch's gate and the output layer are
zero, so that each block starts as the identity and the network's output as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import DictConfig
from .attention import Attention
from .unet import TimestepEmbedding, guidance_embedding, timestep_embedding

TIME_DIM = 256  # sinusoidal timestep features, as in DiT and PixArt


@dataclass(frozen=True)
class DiTConfig(DictConfig):
    in_channels: int = 3
    out_channels: int = 3
    sample_size: int = 32
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_classes: int | None = None  # label rows, the last one the null class (as the U-Net's)
    context_dim: int | None = None  # text token width: the PixArt layout
    time_cond_proj_dim: int | None = None  # guidance scale input of a distilled student
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.patch_size not in (1, 2, 4, 8):
            raise ValueError(f"patch size must be 1, 2, 4 or 8 pixels, got {self.patch_size}")
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"image size {self.sample_size} is not divisible by the patch size "
                f"{self.patch_size}"
            )
        if self.dim % 4:
            raise ValueError(f"the width {self.dim} must be divisible by 4 (2-D positions)")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def text(self) -> bool:
        return self.context_dim is not None

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> DiTConfig:
        """From the config of a `DiTTransformer2DModel` or `PixArtTransformer2DModel`."""
        if d.get("_class_name") == "PixArtTransformer2DModel" or "caption_channels" in d:
            if d.get("use_additional_conditions") or d.get("sample_size") == 128:
                raise ValueError(
                    "PixArt's resolution and aspect-ratio conditions are not supported"
                )
            num_classes, context_dim = None, d["caption_channels"]
        else:
            num_classes, context_dim = d.get("num_embeds_ada_norm", 1000) + 1, None
        return cls(
            in_channels=d["in_channels"],
            out_channels=d.get("out_channels") or d["in_channels"],
            sample_size=d["sample_size"],
            patch_size=d["patch_size"],
            num_layers=d["num_layers"],
            num_attention_heads=d["num_attention_heads"],
            attention_head_dim=d["attention_head_dim"],
            num_classes=num_classes,
            context_dim=context_dim,
        )


def sincos_positions(dim: int, height: int, width: int, base_size: int) -> Tensor:
    """[height * width, dim] 2-D sin-cos positions of a grid of patches, row by row: the first
    half encodes the column, the second the row (diffusers' `get_2d_sincos_pos_embed`); a grid
    other than the trained `base_size` is stretched to the same range of positions."""

    def axis(n: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float64) / (n / base_size)
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = torch.outer(pos.float().double(), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    cols = axis(width)[None].expand(height, -1, -1)
    rows = axis(height)[:, None].expand(-1, width, -1)
    return torch.cat([cols, rows], dim=-1).reshape(height * width, dim).float()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, p, stride=p)
        self.base_size = cfg.sample_size // p
        self._positions: dict[tuple[int, int], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        grid = tuple(h.shape[-2:])
        if grid not in self._positions:
            self._positions[grid] = sincos_positions(h.shape[1], *grid, self.base_size)
        pos = self._positions[grid].to(h.device, h.dtype)
        return h.flatten(2).transpose(1, 2) + pos


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProjection(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[1](self.net[0](x)))


class LabelEmbedding(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class TimestepLabelEmbedding(nn.Module):
    """The conditioning vector of a DiT block: timestep (+ guidance) embedding + class."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_DIM, cfg.dim, cfg.time_cond_proj_dim)
        if cfg.num_classes is not None:
            self.class_embedder = LabelEmbedding(cfg.num_classes, cfg.dim)

    def forward(self, t_features: Tensor, labels: Tensor | None, w: Tensor | None) -> Tensor:
        emb = self.timestep_embedder(t_features, w)
        return emb if labels is None else emb + self.class_embedder(labels)


class AdaLayerNormZero(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.emb = TimestepLabelEmbedding(cfg)
        self.linear = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(self, t_features: Tensor, labels: Tensor | None, w: Tensor | None) -> Tensor:
        """[B, 6, dim]: shift, scale and gate of attention, then of the feed-forward."""
        return self.linear(F.silu(self.emb(t_features, labels, w))).unflatten(1, (6, -1))


class CombinedTimestepEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_DIM, cfg.dim, cfg.time_cond_proj_dim)


class AdaLayerNormSingle(nn.Module):
    """PixArt's adaLN-single: one timestep embedding and its six modulations for all blocks."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(cfg)
        self.linear = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(self, t_features: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
        emb = self.emb.timestep_embedder(t_features, w)
        return self.linear(F.silu(emb)).unflatten(1, (6, -1)), emb


class CaptionProjection(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.context_dim, cfg.dim)
        self.linear_2 = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, context: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(context), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention, (text layout) cross-attention, feed-forward; the first and last
    modulated (shift, scale) and gated by the timestep."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, heads = cfg.dim, cfg.num_attention_heads
        self.text = cfg.text
        if cfg.text:  # PixArt's norms (eps 1e-6); the MLP's is norm2
            self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
            self.attn2 = Attention(dim, heads, dim, bias=True)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        else:  # DiT's (the MLP's norm3, eps 1e-5)
            self.norm1 = AdaLayerNormZero(cfg)
            self.norm3 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, bias=True)
        self.ff = FeedForward(dim, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        modulation: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """`modulation`: the text layout's [B, 6, dim] from adaLN-single; the class layout's
        (timestep features, labels, guidance) for this block's own adaLN-Zero."""
        if self.text:
            mods = self.scale_shift_table[None] + modulation
            normed_1 = F.layer_norm(x, x.shape[-1:], eps=self.norm1.eps)
        else:
            mods = self.norm1(*modulation)
            normed_1 = F.layer_norm(x, x.shape[-1:], eps=1e-6)  # AdaLayerNormZero's own
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.unbind(1)
        x = x + gate1[:, None] * self.dropout(self.attn1(modulate(normed_1, shift1, scale1)))
        if self.text:
            x = x + self.dropout(self.attn2(x, context, mask))
            normed_2 = self.norm2(x)
        else:
            normed_2 = self.norm3(x)
        return x + gate2[:, None] * self.ff(modulate(normed_2, shift2, scale2))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        out = cfg.patch_size**2 * cfg.out_channels
        if cfg.text:
            self.adaln_single = AdaLayerNormSingle(cfg)
            self.caption_projection = CaptionProjection(cfg)
            self.scale_shift_table = nn.Parameter(torch.randn(2, cfg.dim) / cfg.dim**0.5)
            self.proj_out = nn.Linear(cfg.dim, out)
        else:
            self.proj_out_1 = nn.Linear(cfg.dim, 2 * cfg.dim)
            self.proj_out_2 = nn.Linear(cfg.dim, out)
        self.initialize()

    def initialize(self) -> None:
        """DiT's: Xavier-uniform linear layers, zero biases, N(0, 0.02) embeddings; then
        adaLN-Zero: the gates and the output projection zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, TimestepEmbedding):
                for linear in (m.linear_1, m.linear_2):
                    nn.init.normal_(linear.weight, std=0.02)
        conv = self.pos_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        with torch.no_grad():
            for block in self.transformer_blocks:
                if self.config.text:
                    block.scale_shift_table[2].zero_()  # gates of self-attention and MLP
                    block.scale_shift_table[5].zero_()
                    nn.init.zeros_(block.attn2.to_out[0].weight)
                else:
                    nn.init.zeros_(block.norm1.linear.weight)
                    nn.init.zeros_(block.norm1.linear.bias)
            last = self.proj_out if self.config.text else self.proj_out_2
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            if self.config.text:
                nn.init.zeros_(self.adaln_single.linear.weight)
            else:
                nn.init.zeros_(self.proj_out_1.weight)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Predict from x [B, C, H, W] (H and W multiples of the patch size) at timesteps t
        ([B] or scalar); context [B, L, context_dim] with context_mask [B, L] bool (True = real
        token); class_labels [B] long; guidance [B], a distilled student's scale. The same
        arguments as the U-Net's; returns a tensor shaped like x."""
        cfg = self.config
        if (context is None) != (cfg.context_dim is None):
            raise ValueError("context is required exactly when config.context_dim is set")
        if (class_labels is None) != (cfg.num_classes is None):
            raise ValueError("class_labels are required exactly when config.num_classes is set")
        if (guidance is None) != (cfg.time_cond_proj_dim is None):
            raise ValueError("guidance is required exactly when config.time_cond_proj_dim is set")
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        # DiT's timestep features have diffusers' downscale_freq_shift 1, PixArt's 0
        t_features = timestep_embedding(t, TIME_DIM, True, 0.0 if cfg.text else 1.0).to(x.dtype)
        w = None
        if guidance is not None:
            w = torch.as_tensor(guidance, device=x.device).expand(B)
            w = guidance_embedding(w, cfg.time_cond_proj_dim).to(x.dtype)
        h = self.pos_embed(x)
        if cfg.text:
            modulation, emb = self.adaln_single(t_features, w)
            context = self.caption_projection(context.to(x.dtype))
            mask = None
            if context_mask is not None:  # an all-padding row attends to every token
                mask = context_mask.to(device=x.device, dtype=torch.bool)
                mask = mask | ~mask.any(dim=-1, keepdim=True)
            for block in self.transformer_blocks:
                h = block(h, modulation, context, mask)
            shift, scale = (self.scale_shift_table[None] + emb[:, None]).unbind(1)
        else:
            conditioning = (t_features, class_labels, w)
            for block in self.transformer_blocks:
                h = block(h, conditioning)
            emb = self.transformer_blocks[0].norm1.emb(*conditioning)
            shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        h = modulate(self.norm_out(h), shift, scale)
        h = (self.proj_out if cfg.text else self.proj_out_2)(h)
        h = h.view(B, H // p, W // p, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(B, cfg.out_channels, H, W)
