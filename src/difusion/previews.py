"""What a training run shows of its model as it goes: fixed-noise sample grids, and for
text models of `shapes` the alignment probe (the share of fixed prompts satisfied)."""

from __future__ import annotations

from pathlib import Path

import torch

from .images import auto_scale, grid, to_pil
from .model import DiffusionModel
from .runs import write_whole


def alignment_probe(ema: DiffusionModel, n_single: int = 18, n_double: int = 18) -> dict:
    """Fraction of a fixed prompt set the EMA model satisfies (its own sampler and steps:
    20 of DPM-Solver++ for most)."""
    from .alignment import prompt_set, score_batch

    ema.eval()
    prompts = prompt_set(n_single, n_double, seed=0)
    cond, uncond = ema.text_cond(prompts), ema.text_cond([""] * len(prompts))
    x = ema.sample(len(prompts), seed=0, cond=cond, uncond=uncond, guidance=ema.config.guidance)
    scores = score_batch(x, prompts)
    return {"align_single": scores["pass_rate_single"], "align_double": scores["pass_rate_double"]}


PREVIEW_PROMPTS = [
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow circle to the left of a magenta square",
    "a cyan triangle above a red circle",
    "a blue square below a green triangle",
]


def preview(ema: DiffusionModel, path: Path, seed: int = 0, vae=None) -> None:
    """A fixed-noise sample grid, so grids from successive steps compare (decoded by `vae`
    for a latent model)."""
    ema.eval()
    if ema.config.cond == "text":
        prompts = PREVIEW_PROMPTS
        cond, uncond = ema.text_cond(prompts * 3), ema.text_cond([""] * len(prompts) * 3)
        x = ema.sample(len(prompts) * 3, seed=seed, cond=cond, uncond=uncond, guidance=4.0)
        cols = len(prompts)
    elif ema.config.cond == "label":
        k = len(ema.config.class_names or [])
        labels = torch.arange(k).repeat_interleave(max(1, 40 // k))[:40]
        cond, uncond = ema.label_cond(labels)
        x = ema.sample(len(labels), seed=seed, cond=cond, uncond=uncond, guidance=3.0)
        cols = max(1, 40 // k)
    elif ema.config.cond == "image":  # an unCLIP decoder, unconditional (zero embeddings)
        cond, _ = ema.image_cond(torch.zeros(36, ema.config.unet.image_embed_dim))
        x, cols = ema.sample(36, seed=seed, cond=cond), 6
    else:
        x, cols = ema.sample(36, seed=seed), 6
    size = ema.config.image_size
    if vae is not None:
        with torch.no_grad():
            x = vae.decode_latents(x).clamp(-1, 1)
        size *= vae.config.downscale
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, grid(to_pil(x), cols=cols, scale=auto_scale(size, 64)).save)
