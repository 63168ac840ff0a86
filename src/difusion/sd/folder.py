"""Diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`): our U-Net and VAE use diffusers' parameter names, so their safetensors load as
they are; the configs are translated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import CheckpointError, read_safetensors
from ..nn.unet import UNet, UNetConfig
from ..nn.vae import AutoencoderKL, VAEConfig
from ..schedule import ScheduleConfig
from ..text import ClipEncoder
from .assemble import (
    BETA_SCHEDULES,
    LINSPACE_SCHEDULERS,
    PREDICTIONS,
    StableDiffusion,
    assemble,
    load_strict,
)


def schedule_from_diffusers(
    d: dict[str, Any],
) -> tuple[ScheduleConfig, dict[str, Any], bool]:
    """A diffusers `scheduler_config.json` -> our ScheduleConfig, the ModelConfig fields it
    sets (prediction, spacing, steps_offset, clip_x0) and DDIM's `set_alpha_to_one`."""
    if d.get("trained_betas") is not None:
        raise ValueError("schedulers with trained_betas are not supported")
    name = d.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unsupported beta_schedule {name!r}; known: {', '.join(BETA_SCHEDULES)}")
    kind = BETA_SCHEDULES[name]
    T = int(d.get("num_train_timesteps", 1000))
    beta_start, beta_end = float(d.get("beta_start", 1e-4)), float(d.get("beta_end", 0.02))
    if (
        kind == "linear"
    ):  # our linear_betas rescale their range by 1000 / T (DDPM's), diffusers' not
        beta_start, beta_end = beta_start * T / 1000, beta_end * T / 1000
    schedule = ScheduleConfig(
        kind=kind,
        num_steps=T,
        beta_start=None if kind == "cosine" else beta_start,
        beta_end=None if kind == "cosine" else beta_end,
        zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)),
    )
    pred = d.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {pred!r}; known: {', '.join(PREDICTIONS)}")
    cls_name = d.get("_class_name", "")
    default_spacing = "linspace" if cls_name in LINSPACE_SCHEDULERS else "leading"
    spacing = d.get("timestep_spacing") or default_spacing
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    clip = bool(d.get("clip_sample", False))
    if clip and float(d.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError("clip_sample_range other than 1.0 is not supported")
    options = {
        "prediction": PREDICTIONS[pred],
        "spacing": spacing,
        "steps_offset": int(d.get("steps_offset", 0)),
        "clip_x0": clip,
    }
    # DDIM's default is True, PNDM's False; SD's configs say False
    set_alpha_to_one = bool(d.get("set_alpha_to_one", cls_name != "PNDMScheduler"))
    return schedule, options, set_alpha_to_one


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _folder_weights(folder: Path) -> dict[str, Tensor]:
    """The safetensors weights of a diffusers component folder (single file or shards)."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)[0]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard)[0])
        return state
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); they are never unpickled "
            "here: convert them to diffusion_pytorch_model.safetensors"
        )
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors")


def load_diffusers_folder(path: str | Path, prediction: str | None = None) -> StableDiffusion:
    """A diffusers Stable Diffusion folder."""
    root = Path(path)
    index = _read_json(root / "model_index.json")
    if "text_encoder_2" in index or "transformer" in index:
        raise CheckpointError(
            f"{root}: {index.get('_class_name', 'this pipeline')} is not Stable Diffusion 1.x/2.x "
            "(SDXL, SD3 and transformer models are not supported)"
        )
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise CheckpointError(f"{root}: no {part}/ folder: not a Stable Diffusion pipeline")
    try:
        unet_cfg = UNetConfig.from_diffusers_config(_read_json(root / "unet" / "config.json"))
        vae_cfg = VAEConfig.from_diffusers_config(_read_json(root / "vae" / "config.json"))
        sched = _read_json(root / "scheduler" / "scheduler_config.json")
        schedule, options, alpha_one = schedule_from_diffusers(sched)
    except (ValueError, TypeError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{root}: {e}") from None
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)
    load_strict(unet, _folder_weights(root / "unet"), f"{root / 'unet'}")
    load_strict(vae, _folder_weights(root / "vae"), f"{root / 'vae'}")
    try:
        text = ClipEncoder.from_folder(root)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if prediction is not None:
        options["prediction"] = prediction
    return assemble(unet, vae, text, schedule, options, alpha_one, str(root))
