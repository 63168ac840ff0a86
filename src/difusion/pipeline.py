"""Pipeline: prompt -> images, for the shipped model, a user's run, or (later) Stable Diffusion."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from .images import to_pil
from .model import CheckpointError, DiffusionModel, resolve_checkpoint

StepCallback = Callable[[int, float, torch.Tensor], None]


def default_model_path() -> Path:
    path = Path(str(resources.files("difusion") / "weights" / "default.safetensors"))
    if not path.is_file():
        raise CheckpointError("the default model is not installed with this copy of difusion")
    return path


class Pipeline:
    """A text-conditioned DiffusionModel and, for latent models, the VAE that decodes it."""

    def __init__(self, model: DiffusionModel, vae: torch.nn.Module | None = None) -> None:
        if model.config.cond != "text":
            raise CheckpointError(
                "this model is not text-conditioned: draw from it with `difusion sample`"
            )
        self.model = model
        self.vae = vae

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (identity for pixel models)."""
        if self.vae is None:
            return x
        return self.vae.decode_latents(x.to(next(self.vae.parameters()).dtype)).clamp(-1, 1)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "default", device: str | torch.device = "cpu"
    ) -> Pipeline:
        """ "default" (the model shipped with the package), a run folder or a model file."""
        if str(name_or_path) == "default":
            path = default_model_path()
        else:
            path = resolve_checkpoint(name_or_path)
        return cls(DiffusionModel.load(path, device))

    @property
    def default_guidance(self) -> float:
        return self.model.config.guidance

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float | None = None,
        sampler: str = "dpmpp_2m",
        seed: int = 0,
        n: int = 1,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        guidance_rescale: float = 0.0,
    ) -> list[Image.Image]:
        """n images for each prompt (prompt-major order), deterministic for a seed."""
        return to_pil(
            self.sample(
                prompt,
                negative_prompt,
                steps,
                guidance,
                sampler,
                seed,
                n,
                latents,
                callback,
                guidance_rescale,
            )
        )

    @torch.no_grad()
    def sample(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float | None = None,
        sampler: str = "dpmpp_2m",
        seed: int = 0,
        n: int = 1,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        guidance_rescale: float = 0.0,
    ) -> torch.Tensor:
        """As __call__, but the images as a tensor in [-1, 1]; `callback` sees model-space x0."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        prompts = [p for p in prompts for _ in range(n)]
        guidance = self.default_guidance if guidance is None else guidance
        cfg = self.model.config
        shape = (len(prompts), cfg.channels, cfg.image_size, cfg.image_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        cond = self.model.text_cond(prompts)
        uncond = self.model.text_cond([negative_prompt] * len(prompts))
        step_info = None
        if callback is not None:

            def step_info(info: dict) -> None:
                callback(info["i"], info["sigma"], info["x0"])

        x = self.model.sample(
            len(prompts),
            sampler=sampler,
            steps=steps,
            seed=seed,
            cond=cond,
            uncond=uncond,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
            noise=latents,
            callback=step_info,
        )
        return self.decode(x)
