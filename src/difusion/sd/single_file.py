"""Single original (CompVis / LDM layout) checkpoints of SD 1.x and 2.x, `.safetensors` or a
legacy `.ckpt` read only as plain tensors: their keys are renamed to ours, and the
configuration is read off the tensors' shapes."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError
from ..errors import first_line
from ..nn.unet import UNet, UNetConfig
from ..nn.vae import AutoencoderKL, VAEConfig
from ..schedule import NoiseSchedule, ScheduleConfig
from ..text import ClipEncoder
from .assemble import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    PICKLE_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    StableDiffusion,
    assemble,
    layer_indices,
    load_strict,
)
from .clip import clip_from_state, clip_tokenizer, openclip_to_hf, tokenizer_from_folder

WANTED = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a single-file checkpoint that the pipeline needs (EMA copies and
    optimizer state are left on disk). .safetensors, or a .ckpt read only as plain tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    keep = lambda k: k.startswith(WANTED) or k == "alphas_cumprod"  # noqa: E731
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}  # noqa: SIM118
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: expected a .safetensors (or legacy .ckpt) checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path}: not loadable as plain tensors (torch.load weights_only=True: {first_line(e)[:160]}); "
            "it is never unpickled here: convert it to .safetensors"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: no state dict of tensors inside")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor) and keep(k)}


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_config_from_ldm(u: dict[str, Tensor]) -> UNetConfig:
    """Our UNetConfig from the shapes of an LDM U-Net state dict (prefix removed). What shapes
    cannot tell is SD's: 8 heads with conv projections (1.x), 64-d heads with linear ones (2.x)."""
    if "input_blocks.0.0.weight" not in u or "out.2.weight" not in u:
        raise ValueError("no LDM U-Net (input_blocks.0.0 / out.2) in the checkpoint")
    ops = layer_indices(u, r"input_blocks\.(\d+)\.0\.op\.weight$")
    n_out = len(layer_indices(u, r"output_blocks\.(\d+)\."))
    L = ops[0] - 1 if ops else n_out - 1
    n = n_out // (L + 1)
    if n < 1 or n * (L + 1) != n_out or ops != [(b + 1) * (L + 1) for b in range(n - 1)]:
        raise ValueError("unrecognised LDM U-Net layout")
    first = [1 + b * (L + 1) for b in range(n)]
    chans = tuple(u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first)
    attn = tuple(f"input_blocks.{i}.1.proj_in.weight" in u for i in first)
    if "middle_block.1.proj_in.weight" not in u:
        raise ValueError("LDM U-Net without a mid-block transformer")
    proj_in = u["middle_block.1.proj_in.weight"]
    linear = proj_in.dim() == 2
    context_dim = u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    depth = len(layer_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    conv_in = u["input_blocks.0.0.weight"]
    kw: dict[str, Any] = dict(
        in_channels=conv_in.shape[1],
        out_channels=u["out.2.weight"].shape[0],
        block_out_channels=chans,
        layers_per_block=L,
        attention_levels=attn,
        mid_attention=True,
        context_dim=context_dim,
        transformer_layers=depth,
        use_linear_projection=linear,
        num_classes=u["label_emb.weight"].shape[0] if "label_emb.weight" in u else None,
    )
    if linear:
        kw["attention_head_dim"] = 64  # SD 2.x: num_head_channels=64
    else:
        kw["num_heads"] = 8  # SD 1.x: num_heads=8
    return UNetConfig(**kw)


def ldm_unet_key(key: str, cfg: UNetConfig) -> str:
    """The LDM name of one of our (= diffusers') U-Net parameters."""
    L1 = cfg.layers_per_block + 1
    rattn = cfg.attention_levels[::-1]
    top = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "class_embedding": "label_emb",
    }
    for ours, theirs in top.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return f"{RESNET_LDM[name]}.{tail}"

    p = key.split(".")
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
            return f"input_blocks.{(b + 1) * L1}.0.op.{'.'.join(p[5:])}"
        i = 1 + b * L1 + int(p[3])
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"input_blocks.{i}.0.{resnet(rest)}"
        return f"input_blocks.{i}.1.{rest}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}.{resnet(rest)}"
        return f"middle_block.1.{rest}"
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":  # after the attention, if this level has one
            return f"output_blocks.{b * L1 + L1 - 1}.{2 if rattn[b] else 1}.conv.{'.'.join(p[5:])}"
        i = b * L1 + int(p[3])
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"output_blocks.{i}.0.{resnet(rest)}"
        return f"output_blocks.{i}.1.{rest}"
    raise KeyError(key)


def vae_config_from_ldm(v: dict[str, Tensor]) -> VAEConfig:
    """Our VAEConfig from the shapes of an LDM autoencoder state dict (prefix removed)."""
    if "encoder.conv_in.weight" not in v or "decoder.conv_out.weight" not in v:
        raise ValueError("no LDM autoencoder (first_stage_model.encoder/decoder) in the checkpoint")
    levels = layer_indices(v, r"encoder\.down\.(\d+)\.")
    chans = tuple(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    return VAEConfig(
        in_channels=v["encoder.conv_in.weight"].shape[1],
        out_channels=v["decoder.conv_out.weight"].shape[0],
        latent_channels=v["decoder.conv_in.weight"].shape[1],
        block_out_channels=chans,
        layers_per_block=len(layer_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
        mid_attention="encoder.mid.attn_1.q.weight" in v,
        use_quant_conv="quant_conv.weight" in v,
        use_post_quant_conv="post_quant_conv.weight" in v,
    )


def ldm_vae_key(key: str, cfg: VAEConfig) -> str:
    """The LDM name of one of our (= diffusers') VAE parameters."""
    n = len(cfg.block_out_channels)
    p = key.split(".")
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    part, rest = p[0], p[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{part}.norm_out.{rest[1]}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{part}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:])}"
        name = attn[rest[3]]  # mid_block.attentions.0.to_out.0.weight -> mid.attn_1.proj_out.weight
        return f"{part}.mid.attn_1.{name}.{rest[-1]}"
    if rest[0] in ("down_blocks", "up_blocks"):
        level = int(rest[1]) if part == "encoder" else n - 1 - int(rest[1])
        group = "down" if part == "encoder" else "up"
        if rest[2] == "resnets":
            tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{part}.{group}.{level}.block.{rest[3]}.{tail}"
        sampler = "downsample" if part == "encoder" else "upsample"
        return f"{part}.{group}.{level}.{sampler}.conv.{rest[-1]}"
    raise KeyError(key)


def _rename(module: nn.Module, theirs: dict[str, Tensor], name_of, what: str) -> dict[str, Tensor]:
    """Our module's state dict, taken from `theirs` by the renaming `name_of(our_key)`;
    anything missing or left over is an error (strict)."""
    ours: dict[str, Tensor] = {}
    missing = []
    for key, param in module.state_dict().items():
        src = name_of(key)
        if src not in theirs:
            missing.append(src)
            continue
        t = theirs[src]
        if t.dim() > param.dim():  # LDM's VAE attention: 1x1 convolutions where we have Linear
            t = t.reshape(param.shape)
        if t.shape != param.shape:
            raise CheckpointError(
                f"{what}: {src} has shape {tuple(t.shape)}, {key} needs {tuple(param.shape)}"
            )
        ours[key] = t
    used = {name_of(k) for k in ours}
    extra = sorted(set(theirs) - used)
    if missing or extra:
        raise CheckpointError(
            f"{what}: the tensors do not fit the inferred configuration ({len(missing)} missing, "
            f"{len(extra)} unexpected, e.g. {(missing or extra)[0]})"
        )
    return ours


def load_single_file(
    path: str | Path,
    tokenizer: str | Path | None = None,
    prediction: str | None = None,
    image_size: int | None = None,
) -> StableDiffusion:
    """A single original SD 1.x / 2.x checkpoint."""
    path = Path(path)
    state = read_checkpoint(path)
    what = str(path)
    u, v = _strip(state, UNET_PREFIX), _strip(state, VAE_PREFIX)
    try:
        unet_cfg = unet_config_from_ldm(u)
        vae_cfg = vae_config_from_ldm(v)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{what}: {e}") from None
    sd2 = any(k.startswith(OPENCLIP_PREFIX) for k in state)
    if sd2:
        pad, act, drop_last = "!", "gelu", True
        text_state = openclip_to_hf(_strip(state, OPENCLIP_PREFIX))
    elif any(k.startswith(CLIP_PREFIX) for k in state):
        pad, act, drop_last = "<|endoftext|>", "quick_gelu", False
        text_state = _strip(state, CLIP_PREFIX)
    else:
        raise CheckpointError(
            f"{what}: no text encoder (cond_stage_model.transformer / .model): SDXL and "
            "other layouts are not supported"
        )
    if image_size is None:
        image_size = 96 if (sd2 and prediction != "eps") else 64
    unet_cfg.sample_size = image_size
    vae_cfg.sample_size = image_size * vae_cfg.downscale
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)
    load_strict(unet, _rename(unet, u, lambda k: ldm_unet_key(k, unet_cfg), what), what)
    load_strict(vae, _rename(vae, v, lambda k: ldm_vae_key(k, vae_cfg), what), what)
    tok = (
        tokenizer_from_folder(tokenizer, pad)
        if tokenizer is not None
        else clip_tokenizer(pad_token=pad)
    )
    clip = clip_from_state(text_state, tok, act, drop_last, what)
    text = ClipEncoder(clip, tok, max_length=min(77, clip.config.max_position_embeddings))
    # SD 1.x and 2.x were trained on the same scaled-linear schedule (LDM's "linear" in sqrt)
    schedule = ScheduleConfig(
        kind="scaled_linear", num_steps=1000, beta_start=0.00085, beta_end=0.012
    )
    _check_alphas(state.get("alphas_cumprod"), schedule, what)
    options = {
        "prediction": prediction or ("v" if sd2 else "eps"),
        "spacing": "leading",
        "steps_offset": 1,
        "clip_x0": False,
    }
    return assemble(unet, vae, text, schedule, options, False, what)


def _check_alphas(alphas: Tensor | None, schedule: ScheduleConfig, what: str) -> None:
    """LDM checkpoints store their schedule's alphas_cumprod: it must be the one assumed."""
    if alphas is None:
        return
    ours = NoiseSchedule(schedule).alphas_cumprod
    if alphas.shape != ours.shape or (alphas.double() - ours).abs().max() > 1e-4:
        raise CheckpointError(
            f"{what}: its alphas_cumprod are not Stable Diffusion's scaled-linear schedule"
        )
