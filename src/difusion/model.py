"""A trained diffusion model: network + schedule + what it predicts + what conditions it.

Saved as one safetensors file of (EMA) weights whose metadata holds the configuration as
JSON, so a checkpoint is self-describing and never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .denoiser import Cond, Denoiser, DenoiserFn, bind, clamped, guided
from .nn.unet import UNet, UNetConfig
from .samplers import Callback, get_sampler, initial_noise
from .schedule import NoiseSchedule, ScheduleConfig

FORMAT = "difusion/1"
CONDITIONS = (None, "label", "text")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: its message is one line for users."""


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"
    image_size: int = 32
    channels: int = 3
    cond: str | None = None  # None, "label" or "text"
    class_names: list[str] | None = None  # for cond="label"; the null class is len(class_names)
    text_encoder: dict | None = None  # for cond="text": encoder name and identity
    clip_x0: bool = True  # pixel models clamp the x0 estimate to [-1, 1] while sampling

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        d["schedule"] = self.schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["unet"] = UNetConfig.from_dict(d["unet"])
        d["schedule"] = ScheduleConfig.from_dict(d["schedule"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def null_label(self) -> int:
        return len(self.class_names or [])


class DiffusionModel(nn.Module):
    def __init__(self, config: ModelConfig, unet: UNet | None = None) -> None:
        super().__init__()
        if config.cond not in CONDITIONS:
            raise ValueError(f"unknown condition {config.cond!r}; choose label or text")
        self.config = config
        self.unet = unet if unet is not None else UNet(config.unet)
        self.schedule = NoiseSchedule(config.schedule)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.schedule, self.config.prediction)

    def label_cond(self, labels: torch.Tensor | list[int]) -> tuple[Cond, Cond]:
        """Condition and unconditional (null-class) condition for class labels."""
        if self.config.cond != "label":
            raise ValueError(
                "this model is not class-conditional (it was trained without --cond label)"
            )
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        n = self.config.null_label
        if (labels < 0).any() or (labels >= n).any():
            raise ValueError(f"label must be between 0 and {n - 1}")
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, n)}

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        spacing: str = "trailing",
        seed: int = 0,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        guidance: float = 1.0,
        guidance_rescale: float = 0.0,
        noise: torch.Tensor | None = None,
        callback: Callback | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """n samples in the data range [-1, 1], deterministic for a seed."""
        sample_fn = get_sampler(sampler)
        sigmas = self.schedule.sample_sigmas(steps, spacing).to(self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (n, self.config.channels, self.config.image_size, self.config.image_size)
        if noise is None:
            x = initial_noise(shape, float(sigmas[0]), generator, self.device)
        else:
            x = noise.to(self.device) * (1 + float(sigmas[0]) ** 2) ** 0.5
        if uncond is not None and guidance != 1.0:
            fn: DenoiserFn = guided(self.denoiser(), cond, uncond, guidance, guidance_rescale)
        else:
            fn = bind(self.denoiser(), cond)
        if self.config.clip_x0:
            fn = clamped(fn)
        kw = {} if eta is None else {"eta": eta}
        return sample_fn(fn, x, sigmas, callback=callback, generator=generator, **kw)

    def save(self, path: str | Path, extra_metadata: dict | None = None) -> None:
        metadata = {"format": FORMAT, "config": json.dumps(self.config.to_dict())}
        metadata.update(extra_metadata or {})
        state = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
        atomic_save(state, path, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
        tensors, metadata = read_safetensors(path)
        if "config" not in metadata:
            raise CheckpointError(f"{path}: no difusion model configuration in its metadata")
        try:
            config = ModelConfig.from_dict(json.loads(metadata["config"]))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable model configuration ({e})") from None
        with torch.device("meta"):  # no random init: it would cost time and consume the RNG
            unet = UNet(config.unet)
        model = cls(config, unet)
        missing, unexpected = model.unet.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: weights do not fit the configuration "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
            )
        return model.to(device, memory_format=torch.channels_last).eval()


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> None:
    """Write next to the target, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder or a model file -> the model file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint (give a run folder or a .safetensors file)"
        )
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: pickle checkpoints are not read; use safetensors")
    return path
