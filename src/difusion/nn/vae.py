"""The KL autoencoder of latent diffusion, top to bottom in one file.

The layout is diffusers' `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D throughout),
and the parameter names (the state-dict keys) are exactly diffusers', so a diffusers VAE,
Stable Diffusion's included, loads with `load_state_dict(strict=True)`.

    image x [B, 3, H, W] in [-1, 1]
      -> encoder -> quant_conv -> DiagonalGaussian over z [B, latent, H/f, W/f]   (encode)
      z -> post_quant_conv -> decoder -> image                                    (decode)

with f = 2 ** (len(block_out_channels) - 1). The diffusion model sees the scaled latent
`(z - shift_factor) * scaling_factor` (`encode_latents` / `decode_latents`); `encode` and
`decode` work on the unscaled z, as diffusers' do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difusion.nn.attention import Attention
from difusion.nn.unet import norm_silu

from ..configs import DictConfig

EPS = 1e-6  # every GroupNorm of diffusers' VAE
ENCODER_BLOCK = "DownEncoderBlock2D"
DECODER_BLOCK = "UpDecoderBlock2D"
# diffusers keys that do not change the module (or are its bookkeeping)
DIFFUSERS_IGNORED = {"force_upcast"}


@dataclass
class VAEConfig(DictConfig):
    strict = True  # an unknown key is a network this version cannot build

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128)  # one per level; SD: (128, 256, 512, 512)
    layers_per_block: int = 1  # resnets per encoder level (the decoder has one more); SD: 2
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True  # False in SD3 / Flux VAEs
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215  # SD 1.x / 2.x; SDXL 0.13025
    shift_factor: float | None = None
    sample_size: int = 32  # the training resolution, informative only: any multiple of f works

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers_kwargs(self) -> dict[str, Any]:
        """Config of the equivalent diffusers `AutoencoderKL`."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=(ENCODER_BLOCK,) * n,
            up_block_types=(DECODER_BLOCK,) * n,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            act_fn="silu",
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_groups,
            sample_size=self.sample_size,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_attention,
        )

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> VAEConfig:
        """The inverse of `to_diffusers_kwargs`: read a diffusers `vae/config.json` (as a dict).
        Options this autoencoder cannot express raise ValueError rather than load wrongly."""
        chans = tuple(d.get("block_out_channels", (64,)))
        down = list(d.get("down_block_types", [ENCODER_BLOCK]))
        up = list(d.get("up_block_types", [DECODER_BLOCK]))
        if down != [ENCODER_BLOCK] * len(chans) or up != [DECODER_BLOCK] * len(chans):
            raise ValueError(f"unsupported diffusers VAE layout: {down}, {up}")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported diffusers VAE option act_fn={d['act_fn']!r}")
        for key in ("latents_mean", "latents_std"):
            if d.get(key) is not None:
                raise ValueError(f"unsupported diffusers VAE option {key} (per-channel stats)")
        known = set(cls().to_diffusers_kwargs()) | DIFFUSERS_IGNORED
        unknown = {k for k in d if not k.startswith("_")} - known - {"latents_mean", "latents_std"}
        if unknown:
            raise ValueError(f"unknown diffusers VAE options: {sorted(unknown)}")
        size = d.get("sample_size", 32)
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=chans,
            layers_per_block=d.get("layers_per_block", 1),
            norm_groups=d.get("norm_num_groups", 32),
            mid_attention=d.get("mid_block_add_attention", True),
            use_quant_conv=d.get("use_quant_conv", True),
            use_post_quant_conv=d.get("use_post_quant_conv", True),
            scaling_factor=d.get("scaling_factor", 0.18215),
            shift_factor=d.get("shift_factor"),
            sample_size=size if isinstance(size, int) else size[0],
        )


class DiagonalGaussian:
    """The posterior q(z | x): a Gaussian with diagonal covariance, from the encoder's
    moments [B, 2C, H, W] (mean, then log-variance, along the channels)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM and diffusers
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample [B], summed over the latent's elements."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without time embedding."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        h += x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric padding (right and bottom only), as LDM and diffusers' VAE
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock(Attention):
    """Single-head self-attention over the pixels of x [B, C, H, W], with GroupNorm and
    residual (the attention of diffusers' UNetMidBlock2D in the VAE)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = super().forward(h)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        self.attentions = nn.ModuleList([AttentionBlock(channels, g)] if cfg.mid_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, g) for _ in range(2)])

    def forward(self, h: Tensor) -> Tensor:
        h = self.resnets[0](h)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, downsample: bool, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]
        )
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, h: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            h = layer(h)
        return h


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, upsample: bool, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, h: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            h = layer(h)
        return h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g, n = cfg.block_out_channels, cfg.norm_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, i < n - 1, g)
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(chans[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(g, chans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, h))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rchans, g, n = cfg.block_out_channels[::-1], cfg.norm_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rchans[0], 3, padding=1)
        self.mid_block = MidBlock(rchans[0], cfg)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(rchans[max(i - 1, 0)], rchans[i], cfg.layers_per_block + 1, i < n - 1, g)
                for i in range(n)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(g, rchans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rchans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, h))


def channels_last(x: Tensor) -> Tensor:
    # on CPU oneDNN's convolutions run faster channels-last, and the attention gets its tokens
    # [B, H*W, C] as a free view instead of a copy (as in the U-Net)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class AutoencoderKL(nn.Module):
    """`slicing = True` encodes and decodes one image of the batch at a time (less memory,
    same result); `tiled_decode` decodes a large latent in overlapping tiles."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.slicing = False

    def _encode(self, x: Tensor) -> Tensor:
        h = self.encoder(channels_last(x))
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: Tensor) -> Tensor:
        z = channels_last(z)
        z = z if self.post_quant_conv is None else self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior over the unscaled latent of images x [B, C, H, W] in [-1, 1]."""
        if self.slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode(xi) for xi in x.split(1)]))
        return DiagonalGaussian(self._encode(x).contiguous())

    def decode(self, z: Tensor) -> Tensor:
        """Images [B, out_channels, f*h, f*w] (unclamped) from unscaled latents z [B, C, h, w]."""
        if self.slicing and z.shape[0] > 1:
            return torch.cat([self._decode(zi) for zi in z.split(1)])
        return self._decode(z)

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of x through a sample of the posterior (its mean if not
        `sample_posterior`), and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(
        self, x: Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> Tensor:
        """The latents the diffusion model sees: `(z - shift_factor) * scaling_factor`."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, z: Tensor, tile: int | None = None) -> Tensor:
        """Images from the diffusion model's (scaled) latents; `tile` (latent pixels) decodes
        a latent larger than it with `tiled_decode`."""
        z = z / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        if tile is not None and max(z.shape[-2:]) > tile:
            return self.tiled_decode(z, tile=tile, overlap=tile // 4)
        return self.decode(z)

    def tiled_decode(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`decode` in overlapping tiles of `tile` latent pixels (SD: 64 = 512 image pixels),
        for images too large to decode at once. Tiles `overlap` latent pixels apart are blended
        with linear ramps across the overlap, as diffusers' tiled decoding does; the last tile
        of a row or column is moved back to end at the border, so every tile is full size.

        Not exact: each tile's GroupNorm statistics and the mid-block attention only see that
        tile, so the result differs from `decode` by about as much as diffusers' tiling does."""
        if not 0 <= overlap < tile:
            raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
        f = self.config.downscale
        B, _, h, w = z.shape
        out = torch.zeros(B, self.config.out_channels, f * h, f * w, dtype=z.dtype, device=z.device)
        total = torch.zeros(f * h, f * w, dtype=z.dtype, device=z.device)

        def starts(n: int) -> list[int]:
            return [*range(0, n - tile, tile - overlap), n - tile] if n > tile else [0]

        def ramp(n: int, start: int) -> Tensor:
            """Weights along one axis of a tile's output: rising over the overlap with the tile
            before, falling over the overlap with the tile after, 1 elsewhere (and at borders)."""
            size, blend = f * min(tile, n), f * overlap
            r = torch.ones(size, dtype=z.dtype, device=z.device)
            if blend:
                up = (torch.arange(blend, dtype=z.dtype, device=z.device) + 0.5) / blend
                if start > 0:
                    r[:blend] = up
                if start + tile < n:
                    r[-blend:] = torch.minimum(r[-blend:], up.flip(0))
            return r

        for i in starts(h):
            for j in starts(w):
                dec = self.decode(z[:, :, i : i + tile, j : j + tile])
                weight = ramp(h, i)[:, None] * ramp(w, j)[None, :]
                rows, cols = slice(f * i, f * i + dec.shape[2]), slice(f * j, f * j + dec.shape[3])
                out[:, :, rows, cols] += dec * weight
                total[rows, cols] += weight
        return out / total


def vae_loss(
    model: AutoencoderKL,
    x: Tensor,
    kl_weight: float = 1e-6,
    generator: torch.Generator | None = None,
    reconstruction: str = "l1",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training objective of the autoencoder, without perceptual or adversarial terms:
    reconstruction (L1, or "l2") of x through a posterior sample, plus `kl_weight` times the KL
    to N(0, I).

    The weighting is LDM's (per-image sum of the reconstruction error + kl_weight * per-image
    KL, so its kl_weight = 1e-6 means the same here), divided by the number of values in an
    image so that the loss reads as a per-pixel error. Returns the loss and its parts
    (detached): `loss`, `rec` (mean per value), `kl` (mean per image)."""
    recon, posterior = model(x, sample_posterior=True, generator=generator)
    if reconstruction == "l1":
        rec = (recon - x).abs().mean()
    elif reconstruction == "l2":
        rec = (recon - x).pow(2).mean()
    else:
        raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
    kl = posterior.kl().mean()
    loss = rec + kl_weight * kl / x[0].numel()
    return loss, {"loss": loss.detach(), "rec": rec.detach(), "kl": kl.detach()}
