"""The U-Net noise predictor, top to bottom in one file.

Two layouts, chosen by `UNetConfig.context_dim`:

- `context_dim is None`: diffusers' `UNet2DModel` (pixel-space DDPM). Attention levels use a
  self-attention block with its own GroupNorm and residual.
- `context_dim` set: diffusers' `UNet2DConditionModel` (Stable Diffusion). Attention levels
  use a spatial transformer: self-attention, cross-attention to the text tokens, GEGLU MLP.

The parameter names (the state-dict keys) are exactly diffusers', so a diffusers checkpoint
loads with `load_state_dict(strict=True)` and Stable Diffusion's weights by key renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import DictConfig
from .attention import Attention, LayoutMap, LayoutMaps, PreparedContext, TransformerBlock

# diffusers options that this U-Net has only in their default form
DIFFUSERS_FIXED = {
    "time_embedding_type": "positional",
    "center_input_sample": False,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "addition_embed_type": None,
    "act_fn": "silu",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "attn_norm_num_groups": None,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "encoder_hid_dim": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
}


@dataclass
class UNetConfig(DictConfig):
    strict = True  # an unknown key is a network this version cannot build

    in_channels: int = 3
    out_channels: int = 3
    sample_size: int = 32  # the training resolution, informative only: any size works
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (False, True, True)  # one flag per resolution level
    mid_attention: bool = True
    attention_head_dim: int = (
        32  # channels per head: heads = channels // attention_head_dim, at least 1
    )
    num_heads: int | None = None  # if set, the same number of heads at every level (SD 1.x: 8)
    dropout: float = 0.0  # in the ResNet blocks only, as in diffusers
    norm_groups: int = 32
    norm_eps: float = 1e-5
    context_dim: int | None = None  # cross-attention to [B, L, context_dim] tokens
    num_classes: int | None = None  # class embedding added to the time embedding
    transformer_layers: int = 1
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # a guidance scale w as an input (consistency-distilled students, as diffusers' LCM U-Nets):
    # its embedding, projected, joins the timestep's before the time MLP
    time_cond_proj_dim: int | None = None
    # ours, not diffusers': a text-conditioned map of the image, added before the attention
    layout_map: bool = False
    # unCLIP's decoder: a [B, image_embed_dim] embedding, projected, joins the timestep's, and
    # is projected to `image_tokens` context tokens of width context_dim
    image_embed_dim: int | None = None
    image_tokens: int = 4

    def __post_init__(self) -> None:
        # JSON brings lists back: keep tuples so that configs compare equal
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one flag per entry of block_out_channels")
        if self.layout_map and self.context_dim is None:
            raise ValueError("layout_map is for the text-conditioned (context_dim) layout")
        if self.time_cond_proj_dim is not None and self.time_cond_proj_dim < 2:
            raise ValueError("time_cond_proj_dim must be at least 2")
        if self.image_embed_dim is not None and self.context_dim is None:
            raise ValueError("image_embed_dim needs context_dim (the width of its tokens)")

    @property
    def layout_dim(self) -> int:
        return self.block_out_channels[-1]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def heads(self, channels: int) -> int:
        return self.num_heads or max(1, channels // self.attention_head_dim)

    def to_diffusers_kwargs(self) -> dict[str, Any]:
        """Config of the equivalent diffusers model: `UNet2DConditionModel` when `context_dim`
        is set, else `UNet2DModel`."""
        if self.layout_map:
            raise ValueError("diffusers' U-Nets have no layout map")
        if self.image_embed_dim is not None:
            raise ValueError("this U-Net's image embedding input is not expressed in diffusers")
        levels = range(len(self.block_out_channels))
        kw: dict[str, Any] = dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            num_class_embeds=self.num_classes,
        )
        attn = self.attention_levels
        if self.context_dim is None:
            if self.time_cond_proj_dim is not None:
                raise ValueError("diffusers' UNet2DModel takes no guidance input")
            # UNet2DModel has one head dimension for the whole network
            dims = {
                c // self.heads(c) for c, a in zip(self.block_out_channels, attn, strict=True) if a
            }
            if self.mid_attention:
                dims.add(self.block_out_channels[-1] // self.heads(self.block_out_channels[-1]))
            if len(dims) > 1:
                raise ValueError("UNet2DModel cannot express a head dimension that varies by level")
            kw.update(
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
                mid_block_type="UNetMidBlock2D",
                add_attention=self.mid_attention,
                attention_head_dim=dims.pop() if dims else self.attention_head_dim,
            )
        else:
            # UNet2DConditionModel's `attention_head_dim` is, despite its name, the head count
            kw.update(
                down_block_types=tuple(
                    "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn
                ),
                up_block_types=tuple(
                    "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]
                ),
                mid_block_type="UNetMidBlock2DCrossAttn"
                if self.mid_attention
                else "UNetMidBlock2D",
                attention_head_dim=tuple(self.heads(self.block_out_channels[i]) for i in levels),
                cross_attention_dim=self.context_dim,
                time_cond_proj_dim=self.time_cond_proj_dim,
                transformer_layers_per_block=self.transformer_layers,
                use_linear_projection=self.use_linear_projection,
            )
        return kw

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> UNetConfig:
        """The inverse of `to_diffusers_kwargs`, for the configs this U-Net can express
        (UNet2DModel / UNet2DConditionModel with the block types above, SD 1.x and 2.x)."""
        chans = tuple(d["block_out_channels"])
        down, up = list(d["down_block_types"]), list(d["up_block_types"])
        cond = d.get("cross_attention_dim") is not None
        attn_down = "CrossAttnDownBlock2D" if cond else "AttnDownBlock2D"
        up_of = {"DownBlock2D": "UpBlock2D", attn_down: attn_down.replace("Down", "Up")}
        mids = ["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"] if cond else ["UNetMidBlock2D"]
        if (
            not set(down) <= set(up_of)
            or up != [up_of[b] for b in down[::-1]]
            or d.get("mid_block_type", mids[0]) not in mids
            or not isinstance(d.get("layers_per_block", 2), int)
            or not isinstance(d.get("cross_attention_dim", 0), int)
            or d.get("norm_num_groups", 32) is None
        ):
            raise ValueError(f"unsupported diffusers U-Net layout: {down}, {up}")
        for key, default in DIFFUSERS_FIXED.items():
            if d.get(key, default) != default:
                raise ValueError(f"unsupported diffusers U-Net option {key}={d[key]!r}")
        kw: dict[str, Any] = dict(
            in_channels=d.get("in_channels", 4 if cond else 3),
            out_channels=d.get("out_channels", 4 if cond else 3),
            block_out_channels=chans,
            layers_per_block=d.get("layers_per_block", 2),
            attention_levels=tuple(b != "DownBlock2D" for b in down),
            dropout=d.get("dropout", 0.0),
            norm_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            num_classes=d.get("num_class_embeds"),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
        )
        size = d.get("sample_size")
        if size is not None:
            kw["sample_size"] = size if isinstance(size, int) else size[0]
        if cond:
            heads = d.get("attention_head_dim", 8)
            heads = (heads,) * len(chans) if isinstance(heads, int) else tuple(heads)
            if len(set(heads)) == 1:
                kw["num_heads"] = heads[0]
            elif len({c // h for c, h in zip(chans, heads, strict=True)}) == 1:
                kw["attention_head_dim"] = chans[0] // heads[0]
            else:
                raise ValueError(f"unsupported attention_head_dim {heads}")
            layers = d.get("transformer_layers_per_block", 1)
            if not isinstance(layers, int):
                raise ValueError("transformer_layers_per_block must be one int")
            kw.update(
                context_dim=d.get("cross_attention_dim", 1280),
                time_cond_proj_dim=d.get("time_cond_proj_dim"),
                mid_attention=d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
                == "UNetMidBlock2DCrossAttn",
                transformer_layers=layers,
                use_linear_projection=d.get("use_linear_projection", False),
            )
        else:
            head_dim = d.get("attention_head_dim", 8)
            if head_dim is None:
                kw["num_heads"] = 1
            else:
                kw["attention_head_dim"] = head_dim
            kw["mid_attention"] = d.get("add_attention", True)
        return cls(**kw)


def timestep_embedding(
    t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - freq_shift)
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat(
        [args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1
    )
    return F.pad(emb, (0, dim % 2))


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """[B, dim] embedding of guidance scales [B], as diffusers' LCM pipelines make it (of
    1000 (w - 1), sines first)."""
    return timestep_embedding((w.float() - 1) * 1000, dim, flip_sin_to_cos=False, freq_shift=1)


def norm_silu(norm: nn.Module, x: Tensor) -> Tensor:
    h = norm(x)
    # in place saves a tensor; under autograd it would only add a copy (SiLU's backward needs h)
    return F.silu(h, inplace=not h.requires_grad)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.dropout = cfg.dropout
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """`emb` is the time embedding after its SiLU, [B, temb_dim]."""
        # in-place adds are safe on conv outputs: their backward does not need them
        h = self.conv1(norm_silu(self.norm1, x))
        h += self.time_emb_proj(emb)[:, :, None, None]
        h = norm_silu(self.norm2, h)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        h += x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # nearest to the skip connection's size: 2x, or 2x+1 for odd input sizes
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class AttentionBlock(Attention):
    """Self-attention over the pixels of x [B, C, H, W] with GroupNorm and residual
    (UNet2DModel's attention)."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__(channels, heads, bias=True)
        self.group_norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)

    def forward(self, x: Tensor, prepared: PreparedContext | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = super().forward(h)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of x [B, C, H, W], conditioned on context tokens
    (diffusers' Transformer2DModel)."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        assert cfg.context_dim is not None
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        proj = nn.Linear if self.linear else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [
                TransformerBlock(channels, heads, cfg.context_dim)
                for _ in range(cfg.transformer_layers)
            ]
        )
        self.proj_out = proj(channels, channels)
        self.layout_proj = nn.Linear(cfg.layout_dim, channels) if cfg.layout_map else None
        if self.layout_proj is not None:
            nn.init.zeros_(self.layout_proj.weight)
            nn.init.zeros_(self.layout_proj.bias)

    def forward(self, x: Tensor, prepared: PreparedContext) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        if self.linear:
            h = self.proj_in(h)
        if self.layout_proj is not None:
            assert prepared.layout is not None, "a model with a layout map needs its maps"
            h = h + prepared.layout(self.layout_proj, H, W).to(h.dtype)
        for block in self.transformer_blocks:
            h = block(h, prepared)
        if self.linear:
            h = self.proj_out(h)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


def attention_layer(channels: int, cfg: UNetConfig) -> nn.Module:
    if cfg.context_dim is None:
        return AttentionBlock(channels, cfg.heads(channels), cfg)
    return SpatialTransformer(channels, cfg.heads(channels), cfg)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, attention: bool, downsample: bool, cfg: UNetConfig):
        super().__init__()
        n, temb = cfg.layers_per_block, cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, temb, cfg) for i in range(n)]
        )
        self.attentions = nn.ModuleList(
            [attention_layer(cout, cfg) for _ in range(n)] if attention else []
        )
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(
        self, h: Tensor, emb: Tensor, prepared: PreparedContext | None
    ) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[i](h, prepared)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    def __init__(
        self, cin: int, cprev: int, cout: int, attention: bool, upsample: bool, cfg: UNetConfig
    ):
        """cprev: channels coming from the level below; cin: channels that entered this level
        on the way down (its first skip connection)."""
        super().__init__()
        n, temb = cfg.layers_per_block + 1, cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    (cprev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb, cfg
                )
                for i in range(n)
            ]
        )
        self.attentions = nn.ModuleList(
            [attention_layer(cout, cfg) for _ in range(n)] if attention else []
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(
        self,
        h: Tensor,
        skips: list[Tensor],
        emb: Tensor,
        prepared: PreparedContext | None,
        size: tuple[int, int] | None,
    ) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if self.attentions:
                h = self.attentions[i](h, prepared)
        for up in self.upsamplers:
            h = up(h, size)
        return h


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        # without attention diffusers keeps two resnets in UNet2DModel, one in UNet2DConditionModel
        n_res = 2 if cfg.mid_attention or cfg.context_dim is None else 1
        temb = cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, temb, cfg) for _ in range(n_res)]
        )
        self.attentions = nn.ModuleList(
            [attention_layer(channels, cfg)] if cfg.mid_attention else []
        )

    def forward(self, h: Tensor, emb: Tensor, prepared: PreparedContext | None) -> Tensor:
        h = self.resnets[0](h, emb)
        for attn in self.attentions:
            h = attn(h, prepared)
        for resnet in self.resnets[1:]:
            h = resnet(h, emb)
        return h


class UNet(nn.Module):
    # On CPU, activations go channels-last once batch x height x width reaches this: oneDNN's
    # convolutions then run faster, and the attention layers get their tokens [B, H*W, C] as
    # views instead of copies. Below it, re-laying out the conv weights at each call costs
    # more than it saves. None: never.
    channels_last_min_pixels: int | None = 4096

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        chans, attn = cfg.block_out_channels, cfg.attention_levels
        n = len(chans)
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(
            chans[0], cfg.time_embed_dim, cfg.time_cond_proj_dim
        )
        if cfg.num_classes is not None:
            self.class_embedding = nn.Embedding(cfg.num_classes, cfg.time_embed_dim)
        if cfg.image_embed_dim is not None:
            self.image_embedding = nn.Linear(cfg.image_embed_dim, cfg.time_embed_dim)
            self.image_context = nn.Linear(cfg.image_embed_dim, cfg.image_tokens * cfg.context_dim)
        self.down_blocks = nn.ModuleList(
            [DownBlock(chans[max(i - 1, 0)], chans[i], attn[i], i < n - 1, cfg) for i in range(n)]
        )
        self.mid_block = MidBlock(chans[-1], cfg)
        rchans, rattn = chans[::-1], attn[::-1]
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    rchans[min(i + 1, n - 1)],
                    rchans[max(i - 1, 0)],
                    rchans[i],
                    rattn[i],
                    i < n - 1,
                    cfg,
                )
                for i in range(n)
            ]
        )
        if cfg.layout_map:
            assert cfg.context_dim is not None
            heads = cfg.heads(cfg.layout_dim)
            self.layout_map = LayoutMap(cfg.layout_dim, heads, cfg.context_dim, cfg.out_channels)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, chans[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def prepare_context(
        self, context: Tensor, context_mask: Tensor | None = None
    ) -> PreparedContext:
        """What the prompt alone determines: each cross-attention's keys and values, the
        padding mask, the layout maps (at first use). Pass it as `context` to every call of a
        sampling run instead of recomputing it at each step; the result is the same.
        context [B, L, context_dim]; context_mask [B, L] bool, True = real token."""
        if self.config.context_dim is None:
            raise ValueError("this U-Net takes no context (config.context_dim is None)")
        context = context.to(self.conv_in.weight.dtype)
        mask = None
        if context_mask is not None:
            mask = context_mask.to(device=context.device, dtype=torch.bool)
            # an all-padding row would give NaN: let it attend to every token, which is what
            # diffusers' additive bias (-10000 on every score) amounts to
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        keys_values = {
            m.attn2: m.attn2.keys_values(context)
            for m in self.modules()
            if isinstance(m, TransformerBlock)
        }
        layout = LayoutMaps(self.layout_map, context, mask) if self.config.layout_map else None
        return PreparedContext(len(context), keys_values, mask, layout, self)

    def prepare_cond(self, cond: dict) -> dict:
        """`cond` with its context (given, or made of the image embedding) prepared once for a
        sampling run (`prepare_context`); the same result as `cond` itself."""
        context = cond.get("context")
        if context is None and cond.get("image_embed") is not None:
            context = self.image_embed_context(cond["image_embed"])
        if context is None or isinstance(context, PreparedContext):
            return cond
        return {**cond, "context": self.prepare_context(context, cond.get("context_mask")),
                "context_mask": None}  # fmt: skip

    def image_embed_context(self, image_embed: Tensor) -> Tensor:
        """unCLIP's context: an image embedding [B, D] as `image_tokens` tokens [B, k, W]."""
        tokens = self.image_context(image_embed.to(self.image_context.weight.dtype))
        return tokens.view(len(image_embed), self.config.image_tokens, self.config.context_dim)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        context: Tensor | PreparedContext | None = None,
        context_mask: Tensor | None = None,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
        image_embed: Tensor | None = None,
    ) -> Tensor:
        """Predict from x [B, C, H, W] at timesteps t ([B] or scalar, on the 0..T-1 scale).
        context [B, L, context_dim], or what `prepare_context` made of it (and of its mask);
        context_mask [B, L] bool, True = real token; class_labels [B] long; guidance [B], the
        scale w of a distilled student; image_embed [B, image_embed_dim], an unCLIP decoder's
        condition (its tokens are the context unless a prepared one is given). Returns a
        tensor shaped like x."""
        cfg = self.config
        if (image_embed is None) != (cfg.image_embed_dim is None):
            raise ValueError("image_embed is required exactly when config.image_embed_dim is set")
        if image_embed is not None and context is None:
            context = self.image_embed_context(image_embed)
        if (context is None) != (cfg.context_dim is None):
            raise ValueError("context is required exactly when config.context_dim is set")
        if isinstance(context, PreparedContext):
            if context_mask is not None:
                raise ValueError("context_mask goes to prepare_context, with its context")
            if context.unet is not self:
                raise ValueError("the context was prepared by another U-Net")
        elif context is not None:
            context = self.prepare_context(context, context_mask)
        if context is not None and context.batch_size != x.shape[0]:
            raise ValueError(
                f"context has {context.batch_size} rows for a batch of {x.shape[0]} samples"
            )
        if (class_labels is None) != (cfg.num_classes is None):
            raise ValueError("class_labels are required exactly when config.num_classes is set")
        if (guidance is None) != (cfg.time_cond_proj_dim is None):
            raise ValueError("guidance is required exactly when config.time_cond_proj_dim is set")

        B, _, H, W = x.shape
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        w_emb = None
        if guidance is not None:
            w = torch.as_tensor(guidance, device=x.device).expand(B)
            w_emb = guidance_embedding(w, cfg.time_cond_proj_dim).to(x.dtype)
        emb = self.time_embedding(emb.to(x.dtype), w_emb)
        if class_labels is not None:
            emb = emb + self.class_embedding(class_labels)
        if image_embed is not None:
            emb = emb + self.image_embedding(image_embed.to(emb.dtype))
        emb = F.silu(emb)  # every ResnetBlock's time projection starts with a SiLU

        pixels, min_pixels = B * H * W, self.channels_last_min_pixels
        if x.device.type == "cpu" and min_pixels is not None and pixels >= min_pixels:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb, context)
            skips += s
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            level, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None
            h = block(h, level, emb, context, size)
        return self.conv_out(norm_silu(self.conv_norm_out, h)).contiguous()
