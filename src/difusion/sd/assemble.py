"""What Stable Diffusion's parts become in our modules: a `DiffusionModel` of the U-Net, its
schedule and the CLIP encoder, beside the VAE."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError
from ..model import DiffusionModel, ModelConfig
from ..nn.unet import UNet
from ..nn.vae import AutoencoderKL
from ..schedule import ScheduleConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14, transformers layout
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
BETA_SCHEDULES = {
    "scaled_linear": "scaled_linear",
    "linear": "linear",
    "squaredcos_cap_v2": "cosine",
}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# schedulers whose `timestep_spacing` defaulted to "linspace" before the key existed
LINSPACE_SCHEDULERS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)
SD_GUIDANCE = 7.5  # diffusers' default guidance scale for Stable Diffusion


class StableDiffusion(NamedTuple):
    """A Stable Diffusion checkpoint in our modules (float32, on the CPU): what a `Pipeline`
    is built from."""

    model: DiffusionModel  # U-Net, schedule and CLIP text encoder
    vae: AutoencoderKL
    set_alpha_to_one: bool  # the DDIM scheduler's last step, as the checkpoint's config says


def assemble(
    unet: UNet,
    vae: AutoencoderKL,
    text_encoder: nn.Module,
    schedule: ScheduleConfig,
    options: dict[str, Any],
    set_alpha_to_one: bool,
    source: str,
) -> StableDiffusion:
    cfg = unet.config
    if cfg.context_dim is None:
        raise CheckpointError(
            f"{source}: the U-Net has no cross-attention: not a text-to-image model"
        )
    if cfg.in_channels != cfg.out_channels or cfg.in_channels != vae.config.latent_channels:
        raise CheckpointError(
            f"{source}: a U-Net with {cfg.in_channels} input channels for a "
            f"{vae.config.latent_channels}-channel latent (an inpainting or depth model?) is not "
            "supported; inpaint with a regular checkpoint and mask_image="
        )
    if cfg.context_dim != text_encoder.dim:
        raise CheckpointError(
            f"{source}: the U-Net expects {cfg.context_dim}-d text tokens, the text encoder "
            f"gives {text_encoder.dim}-d"
        )
    config = ModelConfig(
        unet=cfg,
        schedule=schedule,
        image_size=cfg.sample_size,
        channels=cfg.in_channels,
        cond="text",
        text_encoder={"name": "clip", "layer": text_encoder.layer, "source": source},
        guidance=SD_GUIDANCE,
        **options,
    )
    # conv weights channels-last once, as DiffusionModel.load does: with NCHW weights oneDNN
    # re-lays them out at every call (a 1280-channel 3x3 conv at 16x16: 0.17 s -> 0.125 s)
    unet, vae = (m.to(memory_format=torch.channels_last) for m in (unet, vae))
    model = DiffusionModel(config, unet, SDTextEncoder(text_encoder)).eval()
    return StableDiffusion(model, vae.eval(), set_alpha_to_one)


class SDTextEncoder(nn.Module):
    """A CLIP encoder as Stable Diffusion's U-Net sees it: every one of the 77 positions,
    padding included (the U-Net was trained without a cross-attention mask), so the mask it
    returns is all True."""

    trainable = False

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.name, self.dim, self.max_length = clip.name, clip.dim, clip.max_length
        self.layer = clip.layer

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tokens, mask = self.clip.encode(prompts)
        return tokens, torch.ones_like(mask)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)

    def pooled(self, prompts: list[str]) -> Tensor:
        return self.clip.pooled(prompts)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.clip.tokenize(prompts)

    def token_count(self, prompt: str) -> int:
        return self.clip.token_count(prompt)

    def identity(self) -> dict:
        return self.clip.identity()


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(
            f"{what}: the weights do not fit the configuration ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {example})"
        )


def layer_indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})
