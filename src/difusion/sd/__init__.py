"""Stable Diffusion checkpoints -> our own modules (U-Net, VAE, CLIP text encoder, schedule).

Two formats are read:

- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`): our U-Net and VAE use diffusers' parameter names, so their safetensors load
  as they are; the configs are translated (`UNetConfig.from_diffusers_config`, ...);
- a single original (CompVis / LDM layout) checkpoint of SD 1.x or 2.x, `.safetensors` or a
  legacy `.ckpt` (read with `torch.load(weights_only=True)`, never unpickled): its keys are
  renamed to ours here, and the configuration is read off the tensors' shapes.

Never a pickle, never a download: a single file carries no tokenizer, so the CLIP BPE
vocabulary comes from a folder the caller names or from the one that ships inside the
installed `open_clip_torch` package (`pip install --no-deps open_clip_torch`).
"""

from __future__ import annotations

from pathlib import Path

from .assemble import PICKLE_SUFFIXES, UNET_PREFIX, SDTextEncoder, StableDiffusion
from .clip import clip_tokenizer, open_clip_bpe
from .folder import load_diffusers_folder
from .single_file import load_single_file

__all__ = [
    "SDTextEncoder",
    "StableDiffusion",
    "clip_tokenizer",
    "is_sd_checkpoint",
    "load_checkpoint",
    "load_diffusers_folder",
    "load_single_file",
    "open_clip_bpe",
]


def is_sd_checkpoint(path: str | Path) -> bool:
    """A diffusers folder (model_index.json), a legacy .ckpt, or a .safetensors file with
    LDM-layout keys. Our own model files (safetensors with a difusion config) are not."""
    path = Path(path)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    if not path.is_file():
        return False
    if path.suffix in PICKLE_SUFFIXES:
        return True
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith(UNET_PREFIX) for k in f.keys())  # noqa: SIM118
    except Exception:  # not a safetensors file: let the regular loader say so
        return False


def load_checkpoint(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    prediction: str | None = None,
    image_size: int | None = None,
) -> StableDiffusion:
    """A diffusers folder or a single original checkpoint. Single files only: `tokenizer` is a
    folder with the CLIP tokenizer (default: the BPE vocabulary of the installed
    open_clip_torch); `prediction` ("eps" or "v") and `image_size` (latent pixels) override
    what is guessed (SD 1.x: eps, 64; SD 2.x: v, 96)."""
    path = Path(path)
    if path.is_dir():
        if tokenizer is not None or image_size is not None:
            raise ValueError("tokenizer= and image_size= are for single-file checkpoints")
        return load_diffusers_folder(path, prediction=prediction)
    return load_single_file(path, tokenizer=tokenizer, prediction=prediction, image_size=image_size)
