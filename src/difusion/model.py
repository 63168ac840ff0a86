"""A trained diffusion model: network + schedule + what it predicts + what conditions it.

The network is a U-Net or, with `backbone` "dit", a diffusion transformer (`nn/dit.py`); it
is the `unet` attribute either way (the name every caller knows), built by `build_network`.

Saved as one safetensors file of (EMA) weights whose metadata holds the configuration as
JSON, so a checkpoint is self-describing and never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, atomic_save, read_safetensors
from .configs import DictConfig
from .denoiser import (
    GUIDANCE_RANGE,
    Cond,
    Denoiser,
    DenoiserFn,
    bind,
    check_guidance,
    clamped,
    consistency,
    guided,
)
from .nn.dit import DiT, DiTConfig
from .nn.unet import UNet, UNetConfig
from .samplers import Callback, get_sampler, initial_noise
from .schedule import NoiseSchedule, ScheduleConfig
from .text import check_identity, load_text_encoder

FORMAT = "difusion/1"
CONDITIONS = (None, "label", "text", "image")  # "image": a CLIP image embedding (unCLIP)
BACKBONES = ("unet", "dit")


@dataclass
class ModelConfig(DictConfig):
    required = ("unet", "schedule")

    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"
    image_size: int = 32
    channels: int = 3
    cond: str | None = None  # None, "label" or "text"
    class_names: list[str] | None = None  # for cond="label"; the null class is len(class_names)
    text_encoder: dict | None = None  # for cond="text": encoder name and identity
    clip_x0: bool = True  # pixel models clamp the x0 estimate to [-1, 1] while sampling
    guidance: float = 5.0  # the classifier-free guidance scale a pipeline uses by default
    sampler: str = "dpmpp_2m"  # ... and the sampler and its number of steps
    steps: int = 20
    spacing: str = "trailing"  # how sampling timesteps are spaced by default
    steps_offset: int = 0  # added to "leading" timesteps (Stable Diffusion 1.x uses 1)
    latent: dict | None = None  # latent models: {"vae": VAEConfig dict, "sha256", "path"}
    # consistency-distilled students: {"sigma_min", "guidance": [lo, hi], "teacher": {...}};
    # guidance is then an input of the network, not a second branch
    consistency: dict | None = None
    clip: dict | None = None  # for cond="image": the CLIP (embed_dim, sha256) it was trained on
    backbone: str = "unet"  # or "dit": the network is `dit`'s, and `unet` is not used
    dit: DiTConfig | None = None

    @property
    def network(self) -> UNetConfig | DiTConfig:
        """The configuration of the network: the U-Net's or the DiT's."""
        return self.dit if self.backbone == "dit" else self.unet

    def with_network(self, network: UNetConfig | DiTConfig) -> ModelConfig:
        """This configuration with another network configuration of its backbone."""
        return replace(self, **{"dit" if self.backbone == "dit" else "unet": network})

    @property
    def null_label(self) -> int:
        return len(self.class_names or [])


def build_network(config: ModelConfig) -> nn.Module:
    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose unet or dit")
    if config.backbone == "dit":
        if config.dit is None:
            raise ValueError("a dit model needs its DiT configuration")
        return DiT(config.dit)
    return UNet(config.unet)


class DiffusionModel(nn.Module):
    """Holds the U-Net, its schedule and, for text models, the text encoder."""

    TEXT_CACHE = 20_000  # prompts whose (frozen) embeddings are kept: training captions repeat

    def __init__(
        self,
        config: ModelConfig,
        unet: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
    ) -> None:
        """`image_encoder`: for cond="image" in training, the CLIP whose image embeddings
        condition the model (frozen, not saved; sampling takes embeddings, not images)."""
        super().__init__()
        if config.cond not in CONDITIONS:
            raise ValueError(f"unknown condition {config.cond!r}; choose label or text")
        if config.cond == "text" and text_encoder is None:
            raise ValueError("a text-conditioned model needs its text encoder")
        self.config = config
        self.unet = unet if unet is not None else build_network(config)
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.schedule = NoiseSchedule(config.schedule)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(self) -> dict[str, torch.Tensor]:
        """What the model file stores: the U-Net, and a text encoder trained with it."""
        state = dict(self.unet.state_dict())
        if self.text_encoder is not None and self.text_encoder.trainable:
            state.update(
                {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
            )
        return state

    def load_weights(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        text = {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")}
        unet = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
        missing, unexpected = self.unet.load_state_dict(unet, strict=False, assign=assign)
        if text and self.text_encoder is not None:
            self.text_encoder.load_state_dict(text, assign=assign)
        if missing or unexpected:
            raise CheckpointError(
                f"weights do not fit the configuration ({len(missing)} missing, "
                f"{len(unexpected)} unexpected tensors)"
            )

    def text_cond(self, prompts: list[str]) -> Cond:
        """Token embeddings and padding mask of prompts, for cross-attention."""
        if self.config.cond != "text" or self.text_encoder is None:
            raise ValueError("this model is not text-conditioned")
        if self.text_encoder.trainable and self.training:
            tokens, mask = self.text_encoder.encode(prompts)
        else:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
            if missing:
                with torch.no_grad():
                    tokens, mask = self.text_encoder.encode(missing)
                if len(self._text_cache) + len(missing) > self.TEXT_CACHE:
                    self._text_cache.clear()
                for i, p in enumerate(missing):
                    self._text_cache[p] = (tokens[i], mask[i])
            tokens = torch.stack([self._text_cache[p][0] for p in prompts])
            mask = torch.stack([self._text_cache[p][1] for p in prompts])
        return {"context": tokens.to(self.device), "context_mask": mask.to(self.device)}

    def image_cond(self, embeds: torch.Tensor) -> tuple[Cond, Cond]:
        """Condition and unconditional (zero embedding, as dropped in training) condition of
        CLIP image embeddings [B, D]."""
        if self.config.cond != "image":
            raise ValueError("this model is not conditioned on image embeddings")
        embeds = embeds.to(self.device, torch.float32)
        return {"image_embed": embeds}, {"image_embed": torch.zeros_like(embeds)}

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """The training images' CLIP embeddings [B, D] (images in [-1, 1])."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder (a CLIP) to embed images with")
        return self.image_encoder.encode_image(images).to(self.device)

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.eval()
        if self.text_encoder is not None:
            if self.text_encoder.trainable:
                self._text_cache.clear()  # its embeddings change as it trains
            else:
                self.text_encoder.eval()  # a frozen encoder never trains (no dropout)
        return self

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

    @property
    def guidance_range(self) -> tuple[float, float]:
        """The guidance scales the model takes: a distilled student, those it learnt."""
        distilled = self.config.consistency
        return tuple(distilled["guidance"]) if distilled else GUIDANCE_RANGE

    def guided_denoiser(
        self,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        guidance: float = 1.0,
        guidance_rescale: float = 0.0,
    ) -> DenoiserFn:
        """The denoiser a sampler sees: classifier-free guidance (one batched forward of both
        branches), or for a distilled student its consistency function with the guidance
        scale as an input; pixel models' x0 estimates clamped to [-1, 1]."""
        check_guidance(guidance)
        if self.config.consistency is not None:
            lo, hi = self.guidance_range
            if not lo <= guidance <= hi:
                raise ValueError(
                    f"guidance must be from {lo:g} to {hi:g} for this distilled model, got "
                    f"{guidance:g}"
                )
            fn = bind(self.denoiser(), with_guidance(cond, guidance, self.config))
        elif uncond is not None and guidance != 1.0:
            fn = guided(self.denoiser(), cond, uncond, guidance, guidance_rescale)
        else:
            fn = bind(self.denoiser(), cond)
        if self.config.clip_x0:
            fn = clamped(fn)
        if self.config.consistency is not None:
            fn = consistency(fn, self.config.consistency["sigma_min"])
        return fn

    @torch.inference_mode()  # returns inference tensors: clone one to change it in place
    def sample(
        self,
        n: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        seed: int = 0,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        guidance: float = 1.0,
        guidance_rescale: float = 0.0,
        noise: torch.Tensor | None = None,
        callback: Callback | None = None,
        eta: float | None = None,
        size: tuple[int, int] | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        final_sigma: float = 0.0,
    ) -> torch.Tensor:
        """n samples in the data range [-1, 1], deterministic for a seed.

        `sampler` and `steps` default to the model's own (`config.sampler`, `config.steps`).
        `size` (h, w) overrides the model's square `image_size`. `noise` is the initial noise
        in the model's unit-variance view (diffusers' `latents`). `init` (clean samples, [n or
        1, C, h, w]) starts img2img: the run skips the first `1 - strength` of its steps and
        starts from `init` noised to that step's sigma. `mask` ([n or 1, 1, h, w], 1 = generate,
        0 = keep `init`) inpaints: at every step the kept region is `init` re-noised to the
        current sigma, and its x0 estimate is `init` itself, so it works for any denoiser.
        `generator` replaces the one seeded by `seed`. `final_sigma` > 0 ends the run short of
        the clean sample (diffusers' DDIM with `set_alpha_to_one=False`); the result is then
        returned in the model's view, x / sqrt(1 + final_sigma^2)."""
        sampler = sampler or self.config.sampler
        steps = steps or self.config.steps
        sample_fn = get_sampler(sampler)
        fn = self.guided_denoiser(cond, uncond, guidance, guidance_rescale)
        spacing = spacing or self.config.spacing
        sigmas = self.schedule.sample_sigmas(
            steps, spacing, self.config.steps_offset, final_sigma
        ).to(self.device)
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        h, w = size or (self.config.image_size, self.config.image_size)
        shape = (n, self.config.channels, h, w)
        if mask is not None and init is None:
            raise ValueError("inpainting (mask) needs the image to keep (init)")
        if init is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            kept = steps_kept(steps, strength)
            if kept < 1:
                raise ValueError(f"strength {strength} leaves no step of {steps} to run")
            sigmas = sigmas[steps - kept :]
            init = init.to(self.device, torch.float32).expand(shape)
            if noise is None:
                noise = initial_noise(shape, 0.0, generator, self.device)
            noise = noise.to(self.device)
            x = init + float(sigmas[0]) * noise
        else:
            if noise is None:
                noise = initial_noise(shape, 0.0, generator, self.device)
            x = noise.to(self.device) * self.schedule.noise_std(float(sigmas[0]))
        if mask is not None:
            m = mask.to(self.device, torch.float32)
            denoise = fn

            def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
                x = m * x + (1 - m) * (init + s * noise)
                return m * denoise(x, sigma) + (1 - m) * init

        kw = {} if eta is None else {"eta": eta}
        x = sample_fn(fn, x, sigmas, callback=callback, generator=generator, **kw)
        if mask is not None:
            x = m * x + (1 - m) * (init + float(sigmas[-1]) * noise)
        return x / self.schedule.noise_std(float(sigmas[-1])) if sigmas[-1] > 0 else x

    def save(
        self,
        path: str | Path,
        extra_metadata: dict | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """`dtype=torch.float16` halves the file (the shipped model); loading returns float32."""
        metadata = {"format": FORMAT, "config": json.dumps(self.config.to_dict())}
        metadata.update(extra_metadata or {})
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.weights().items()}
        atomic_save(state, path, metadata)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        text_encoder_path: str | None = None,
    ) -> DiffusionModel:
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") == "difusion-vae/1":
            raise CheckpointError(f"{path}: a VAE, not a diffusion model")
        if "config" not in metadata:
            raise CheckpointError(f"{path}: no difusion model configuration in its metadata")
        try:
            config = ModelConfig.from_dict(json.loads(metadata["config"]))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable model configuration ({e})") from None
        text_encoder = None
        if config.cond == "text":
            text_encoder = text_encoder_for(config.text_encoder or {}, tensors, text_encoder_path)
        try:
            with torch.device("meta"):  # no random init: it would cost time and consume the RNG
                unet = build_network(config)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        model = cls(config, unet, text_encoder)
        try:
            model.load_weights({k: v.float() for k, v in tensors.items()}, assign=True)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return model.to(device, memory_format=torch.channels_last).eval()


def steps_kept(steps: int, strength: float) -> int:
    """The steps an img2img run of `strength` runs of `steps` (as diffusers' img2img counts)."""
    return min(int(steps * strength), steps)


def with_guidance(cond: Cond | None, guidance: float | torch.Tensor, config: ModelConfig) -> Cond:
    """The condition of a student that takes the guidance scale as an input."""
    if config.network.time_cond_proj_dim is None:  # an unconditional teacher: nothing to guide
        return cond
    return {**(cond or {}), "guidance": torch.as_tensor(guidance, dtype=torch.float32)}


def text_encoder_for(
    spec: dict, tensors: dict[str, torch.Tensor], path: str | None = None
) -> nn.Module:
    """Rebuild the text encoder a checkpoint was trained with, and check it is the same one."""
    name = spec.get("name")
    if name is None:
        raise CheckpointError("text model without a text encoder in its configuration")
    if name == "scratch":
        state = {k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
        encoder = load_text_encoder("scratch", config=spec["config"], state_dict=state)
    else:
        encoder = load_text_encoder(name, path=path or spec.get("path"))
    try:
        check_identity(spec["identity"], encoder)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return encoder


SHIPPED = ("default", "default-fast", "default-bilingual")  # the text model, its student, and
# the text model fine-tuned on English and Spanish captions


def default_model_path(name: str = "default") -> Path:
    """A model shipped inside the package: "default" (text-to-image), "default-fast" (its
    distilled few-step student)."""
    path = Path(str(resources.files("difusion") / "weights" / f"{name}.safetensors"))
    if not path.is_file():
        raise CheckpointError(f"the {name} model is not installed with this copy of difusion")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """ "default" / "default-fast" (shipped), a run folder or a model file -> the model file."""
    if str(path) in SHIPPED:
        return default_model_path(str(path))
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
