"""DCGAN (Radford et al. 2016): the baseline the diffusion models are compared with.

Generator: a z vector [N, z_dim] seen as a 1x1 map, a 4x4 transposed convolution, then
stride-2 transposed convolutions doubling the size up to S (16, 32 or 64), BatchNorm + ReLU
after every hidden layer and tanh at the output, so images lie in [-1, 1].
Discriminator: the mirror image, stride-2 convolutions with LeakyReLU(0.2), BatchNorm on
every layer but the first, and a 4x4 convolution to one logit. No biases before a
BatchNorm; weights start from N(0, 0.02) (BatchNorm scales from N(1, 0.02)). At 64 px with
64 base channels and z_dim 100 this is exactly the DCGAN of the paper and of PyTorch's
tutorial (3,576,704 and 2,765,568 parameters for 3 channels).

A trained generator is saved (`GAN.save`) as safetensors whose metadata holds
{"format": "difusion-gan/1", "config": GANConfig as JSON}; `GAN.load` reads it back and
`GAN.sample(n, seed)` draws images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..checkpoints import CheckpointError, atomic_save, read_safetensors
from ..configs import DictConfig

FORMAT = "difusion-gan/1"


@dataclass
class GANConfig(DictConfig):
    image_size: int = 32
    channels: int = 1
    z_dim: int = 100
    g_channels: int = 64  # generator channels at the last hidden layer (x2 per level down)
    d_channels: int = 64  # discriminator channels at the first layer (x2 per level down)
    max_mult: int = 8  # cap of the channel multiplier (DCGAN's 8x at 4x4 for 64 px)
    data: str | None = None  # what it was trained on (informative)

    cond: ClassVar[None] = None  # unconditional: lets code that asks `config.cond` work

    def __post_init__(self) -> None:
        s = self.image_size
        if s < 8 or s & (s - 1):
            raise ValueError(f"GAN: image_size must be a power of two >= 8, got {s}")
        if self.channels < 1 or self.z_dim < 1 or self.g_channels < 1 or self.d_channels < 1:
            raise ValueError("GAN: channels, z_dim, g_channels and d_channels must be positive")

    @property
    def levels(self) -> int:
        """Stride-2 layers between 4x4 and the image size."""
        return int(math.log2(self.image_size // 4))


def init_dcgan(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm N(1, 0.02) scale, 0 shift."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z [N, z_dim] (or [N, z_dim, 1, 1]) -> images [N, C, S, S] in [-1, 1]."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = c = config
        mults = [min(2 ** (c.levels - 1 - i), c.max_mult) for i in range(c.levels)]
        width = [c.g_channels * m for m in mults]  # channels at 4x4, 8x8, ..., S/2
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(c.z_dim, width[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(width[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(width, width[1:], strict=False):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(width[-1], c.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(len(z), -1, 1, 1))


class Discriminator(nn.Module):
    """images [N, C, S, S] -> real/fake logits [N]."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = c = config
        width = [c.d_channels * min(2**i, c.max_mult) for i in range(c.levels)]
        layers: list[nn.Module] = [
            nn.Conv2d(c.channels, width[0], 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, True),
        ]
        for c_in, c_out in zip(width, width[1:], strict=False):
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: -log D(x) - log(1 - D(G(z))), with logits."""
    softplus = nn.functional.softplus
    return softplus(-logits_real).mean() + softplus(logits_fake).mean()


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss: -log D(G(z))."""
    return nn.functional.softplus(-logits_fake).mean()


class GAN(nn.Module):
    """A trained (EMA) generator with its configuration: what a GAN run's model file holds."""

    def __init__(self, config: GANConfig, generator: Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.generator = generator if generator is not None else Generator(config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def noise(self, n: int, seed: int = 0) -> torch.Tensor:
        """The z vectors of `sample(n, seed)`: drawn on the CPU, so the same on any device."""
        return torch.randn(n, self.config.z_dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def sample(
        self, n: int, seed: int = 0, *, z: torch.Tensor | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        """n images [n, C, S, S] in [-1, 1] on the model's device; deterministic for a seed
        (BatchNorm uses its running statistics, so the batch size does not matter)."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        z = self.noise(n, seed) if z is None else z
        was = self.generator.training
        self.generator.eval()
        out = [
            self.generator(z[i : i + batch_size].to(self.device)) for i in range(0, n, batch_size)
        ]
        self.generator.train(was)
        return torch.cat(out)

    def save(self, path: str | Path, extra_metadata: dict | None = None) -> None:
        metadata = {"format": FORMAT, "config": json.dumps(self.config.to_dict())}
        metadata.update(extra_metadata or {})
        state = {k: v.detach().contiguous().cpu() for k, v in self.generator.state_dict().items()}
        atomic_save(state, path, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> GAN:
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") != FORMAT or "config" not in metadata:
            raise CheckpointError(f"{path}: not a difusion GAN checkpoint")
        try:
            config = GANConfig.from_dict(json.loads(metadata["config"]))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable GAN configuration ({e})") from None
        model = cls(config)
        try:
            model.generator.load_state_dict(tensors)
        except RuntimeError:
            raise CheckpointError(f"{path}: weights do not fit the GAN configuration") from None
        return model.to(device).eval()


def is_gan_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file written by `GAN.save`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
