"""unCLIP (DALL-E 2): a prior turns the prompt's CLIP text embedding into a CLIP image
embedding, and a decoder, a U-Net conditioned on that embedding, draws the picture. The
same decoder draws variations of any picture from its image embedding.

An unCLIP model is a folder that `Pipeline.from_pretrained` loads:

    unclip.json             {"format": "difusion-unclip/1"}
    prior.safetensors       the prior (prior.py)
    decoder.safetensors     the decoder: a diffusion model with cond="image" (model.py)
    clip/                   the CLIP folder both were trained on (clip.py)
    vae.safetensors         a latent decoder's VAE, when it has one
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from PIL import Image

from .checkpoints import CheckpointError, file_sha256, read_metadata
from .clip import Clip
from .denoiser import Cond
from .images import to_pil
from .model import DiffusionModel, resolve_checkpoint
from .pipeline import ImageInput, Pipeline
from .prior import Prior, text_cond

FORMAT = "difusion-unclip/1"
MANIFEST = "unclip.json"


def is_unclip(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def frozen_clip(folder: str | Path, device: str | torch.device = "cpu") -> Clip:
    """A CLIP folder, frozen, with `spec`: what a model trained through it records of it."""
    folder = Path(folder)
    clip = Clip.load(folder).requires_grad_(False).eval().to(device)
    clip.spec = {
        "embed_dim": clip.embed_dim,
        "sha256": file_sha256(folder / "model.safetensors"),
        "path": str(folder.resolve()),
    }
    return clip


def check_clip(clip: Clip, spec: dict | None, what: str) -> None:
    """Refuse a CLIP that is not the one `what` (the prior, the decoder) was trained on."""
    spec = spec or {}
    folder = clip.spec["path"]
    if clip.embed_dim != spec.get("embed_dim"):
        raise ValueError(
            f"{folder}: its embeddings have {clip.embed_dim} values; the {what} takes "
            f"{spec.get('embed_dim')}"
        )
    if clip.spec["sha256"] != spec.get("sha256"):
        raise ValueError(f"{folder}: not the CLIP the {what} was trained on (sha256 differs)")


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors [..., D]: a at w = 0, b at w = 1."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.arccos(cos)
    if float(theta.max()) < 1e-4:
        return torch.nn.functional.normalize(a + w * (b - a), dim=-1)
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)


class UnclipPipeline(Pipeline):
    """text -> prior -> image embedding -> decoder; every sampler, guidance and callback of
    `Pipeline` apply to the decoder. `prior_guidance`, `prior_steps` and `prior_sampler`
    default to the prior's own."""

    def __init__(self, prior: Prior, decoder: DiffusionModel, clip: Clip, vae=None) -> None:
        super().__init__(decoder, vae)
        if decoder.config.cond != "image":
            raise ValueError("an unCLIP decoder is a model conditioned on image embeddings")
        check_clip(clip, decoder.config.clip, "decoder")
        check_clip(clip, prior.config.clip, "prior")
        self.prior, self.clip = prior, clip
        self.prior_guidance: float | None = None
        self.prior_steps: int | None = None
        self.prior_sampler: str | None = None

    @property
    def kind(self) -> str:
        return "text"

    @property
    def max_tokens(self) -> int:
        return self.clip.config.context_length

    def truncated(self, prompt: str) -> bool:
        return len(self.clip.tokenizer(prompt)["input_ids"]) > self.max_tokens

    def prior_embeds(
        self, prompts: list[str], negative_prompt: str = "", seed: int = 0
    ) -> torch.Tensor:
        """Unit image embeddings [B, D] the prior draws for the prompts (one draw each)."""
        cond = text_cond(self.clip, prompts)
        uncond = text_cond(self.clip, [negative_prompt] * len(prompts))
        return self.prior.sample(
            cond, uncond, guidance=self.prior_guidance, sampler=self.prior_sampler,
            steps=self.prior_steps, seed=seed,
        )  # fmt: skip

    def conditions(
        self, prompts: list[str], negative_prompt: str = "", seed: int = 0
    ) -> tuple[Cond, Cond]:
        self.warn_about_prompts([*prompts, negative_prompt])
        return self.model.image_cond(self.prior_embeds(prompts, negative_prompt, seed))

    @torch.no_grad()
    def image_embeds(self, images: list[ImageInput]) -> torch.Tensor:
        """Unit CLIP image embeddings [B, D] of PIL images or [3, H, W] tensors in [-1, 1]."""
        pixels = []
        for image in images:
            size = (image.height, image.width) if isinstance(image, Image.Image) else None
            pixels.append(self._image(image, size or tuple(image.shape[-2:])))
        return torch.cat([self.clip.encode_image(p) for p in pixels])

    @torch.no_grad()
    def variations(
        self,
        image: ImageInput,
        n: int = 4,
        *,
        mix: ImageInput | None = None,
        weights: list[float] | None = None,
        seed: int = 0,
        **kwargs,
    ) -> list[Image.Image]:
        """n new pictures of the image's content, drawn from its CLIP image embedding. With
        `mix`, one picture per weight along the slerp from the image's embedding (0) to the
        mix's (1), all from the same noise. `kwargs` are `sample`'s (steps, guidance, ...)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if mix is None:
            embeds = self.image_embeds([image]).expand(n, -1)
            latents = None
        else:
            weights = [0.0, 0.25, 0.5, 0.75, 1.0] if weights is None else list(weights)
            if not weights or any(not 0 <= w <= 1 for w in weights):
                raise ValueError(f"weights must lie in [0, 1], got {weights}")
            a, b = self.image_embeds([image, mix]).chunk(2)
            embeds = torch.cat([slerp(a, b, w) for w in weights])
            h, w = kwargs.get("height") or self.image_size, kwargs.get("width") or self.image_size
            f, c = self.downscale, self.model.config.channels
            noise = torch.randn(
                (1, c, h // f, w // f), generator=torch.Generator().manual_seed(seed)
            )
            latents = noise.expand(len(embeds), -1, -1, -1)
        cond = self.model.image_cond(embeds)
        x = self.sample([""] * len(embeds), seed=seed, latents=latents, conditions=cond, **kwargs)
        return to_pil(x)

    def to(self, device=None, dtype=None) -> UnclipPipeline:
        super().to(device, dtype)
        if device is not None:
            self.prior.to(device)
            self.clip.to(device)
        return self

    @classmethod
    def load(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype=None
    ) -> UnclipPipeline:
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{folder / MANIFEST}: not an unCLIP model (format {FORMAT})")
        prior = Prior.load(folder / "prior.safetensors", device)
        decoder = DiffusionModel.load(folder / "decoder.safetensors", device)
        clip = frozen_clip(folder / "clip", device)
        vae = None
        if decoder.config.latent is not None:
            from .vae_train import vae_for

            vae = vae_for(decoder.config.latent, device, str(folder / "vae.safetensors"))
        return cls(prior, decoder, clip, vae).to(dtype=dtype)


def pack(prior_run: str | Path, decoder_run: str | Path, out: str | Path, clip=None) -> Path:
    """`difusion unclip`: the prior, the decoder and their CLIP folder (`clip`, or the one the
    decoder was trained through) as one unCLIP model folder."""
    prior_path = Path(prior_run) / "model.safetensors" if Path(prior_run).is_dir() else prior_run
    prior = Prior.load(prior_path)
    decoder_path = resolve_checkpoint(decoder_run)
    decoder = DiffusionModel.load(decoder_path)
    if decoder.config.cond != "image":
        raise ValueError(f"{decoder_run}: not an unCLIP decoder (train it with --model decoder)")
    clip_folder = Path(clip or decoder.config.clip["path"])
    UnclipPipeline(prior, decoder, frozen_clip(clip_folder))  # every part fits the others
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prior_path, out / "prior.safetensors")
    shutil.copyfile(decoder_path, out / "decoder.safetensors")
    shutil.copytree(clip_folder, out / "clip")
    if decoder.config.latent is not None:
        shutil.copyfile(decoder.config.latent["path"], out / "vae.safetensors")
    steps = {
        name: read_metadata(path).get("step")
        for name, path in (("prior", prior_path), ("decoder", decoder_path))
    }
    manifest = {"format": FORMAT, "trained_steps": steps}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
