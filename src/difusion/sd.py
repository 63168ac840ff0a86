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

import gzip
import importlib.util
import json
import pickle
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .model import CheckpointError, DiffusionModel, ModelConfig
from .nn.unet import UNet, UNetConfig
from .nn.vae import AutoencoderKL, VAEConfig
from .schedule import ScheduleConfig

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


# --- what is a Stable Diffusion checkpoint -------------------------------------------------------


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


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    tokenizer: str | Path | None = None,
    prediction: str | None = None,
    image_size: int | None = None,
):
    """A Stable Diffusion checkpoint as a `Pipeline` of our modules.

    `dtype` (e.g. torch.bfloat16) is that of the U-Net and the VAE; the text encoder stays
    float32. Single files only: `tokenizer` is a folder with the CLIP tokenizer (default: the
    BPE vocabulary of the installed open_clip_torch); `prediction` ("eps" or "v") and
    `image_size` (latent pixels) override what is guessed (SD 1.x: eps, 64; SD 2.x: v, 96).
    """
    path = Path(path)
    if path.is_dir():
        if tokenizer is not None or image_size is not None:
            raise ValueError("tokenizer= and image_size= are for single-file checkpoints")
        pipe = load_diffusers_folder(path, prediction=prediction)
    else:
        pipe = load_single_file(
            path, tokenizer=tokenizer, prediction=prediction, image_size=image_size
        )
    pipe.to(device, dtype)
    return pipe


def _pipeline(
    unet: UNet,
    vae: AutoencoderKL,
    text_encoder: nn.Module,
    schedule: ScheduleConfig,
    options: dict[str, Any],
    set_alpha_to_one: bool,
    source: str,
):
    from .pipeline import Pipeline

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
    return Pipeline(model, vae.eval(), set_alpha_to_one=set_alpha_to_one)


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


# --- scheduler config -> schedule ---------------------------------------------------------------


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


# --- (a) diffusers folders ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _folder_weights(folder: Path) -> dict[str, Tensor]:
    """The safetensors weights of a diffusers component folder (single file or shards)."""
    from .model import read_safetensors

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


def _load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(
            f"{what}: the weights do not fit the configuration ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {example})"
        )


def load_diffusers_folder(path: str | Path, prediction: str | None = None):
    """A diffusers Stable Diffusion folder -> Pipeline (float32, on the CPU)."""
    from .text import ClipEncoder

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
    _load_strict(unet, _folder_weights(root / "unet"), f"{root / 'unet'}")
    _load_strict(vae, _folder_weights(root / "vae"), f"{root / 'vae'}")
    try:
        text = ClipEncoder.from_folder(root)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if prediction is not None:
        options["prediction"] = prediction
    return _pipeline(unet, vae, text, schedule, options, alpha_one, str(root))


# --- (b) single original (LDM-layout) files -----------------------------------------------------

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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not loadable as plain tensors (torch.load weights_only=True: {first[:160]}); "
            "it is never unpickled here: convert it to .safetensors"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: no state dict of tensors inside")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor) and keep(k)}


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


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
    ops = _indices(u, r"input_blocks\.(\d+)\.0\.op\.weight$")
    n_out = len(_indices(u, r"output_blocks\.(\d+)\."))
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
    depth = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
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
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    chans = tuple(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    return VAEConfig(
        in_channels=v["encoder.conv_in.weight"].shape[1],
        out_channels=v["decoder.conv_out.weight"].shape[0],
        latent_channels=v["decoder.conv_in.weight"].shape[1],
        block_out_channels=chans,
        layers_per_block=len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
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


# --- CLIP text encoders from single files ---------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table for byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def open_clip_bpe() -> Path:
    """CLIP's BPE merges file that ships inside the installed open_clip_torch package
    (found without importing open_clip, which would import torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "this checkpoint has no tokenizer: pass tokenizer=FOLDER (vocab.json + merges.txt), "
            "or install CLIP's vocabulary with: pip install --no-deps open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise CheckpointError(f"{path}: CLIP's BPE vocabulary is missing from open_clip_torch")
    return path


@lru_cache(maxsize=4)
def _bpe_tables(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1])
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(
    bpe_path: str | Path | None = None, pad_token: str = "<|endoftext|>", max_length: int = 77
):
    """CLIP's tokenizer (49408 tokens, as openai/clip-vit-large-patch14's vocab.json) built
    from the BPE merges file; `pad_token="!"` gives OpenCLIP's (SD 2.x) padding with id 0."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_tables(str(bpe_path or open_clip_bpe()))
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length
    )


def _tokenizer_from_folder(folder: str | Path, pad_token: str):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(
            str(folder), local_files_only=True, pad_token=pad_token, model_max_length=77
        )
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load a CLIP tokenizer from {folder}: {msg}") from None


def openclip_to_hf(o: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text tower (prefix removed) -> transformers' CLIPTextModel names."""
    out: dict[str, Tensor] = {}
    names = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    layer = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in o.items():
        if k in names:
            out[names[k]] = v
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m is None:
            m2 = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
            if m2 is None:
                continue  # text_projection, logit_scale, attn_mask: not part of the encoder
            i, kind = m2.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3), strict=True):
                out[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = part
            continue
        i, name, kind = m.groups()
        if name == "attn.in_proj":
            continue
        if name not in layer:
            raise CheckpointError(f"unknown OpenCLIP tensor {k}")
        out[f"encoder.layers.{i}.{layer[name]}.{kind}"] = v
    return out


def _clip_from_state(
    t: dict[str, Tensor], tokenizer, act: str, drop_last: bool, what: str
) -> nn.Module:
    """A transformers CLIPTextModel holding these tensors (transformers' names, any prefix
    "text_model." removed); heads are 64-d, as in every SD text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = {k.removeprefix("text_model."): v for k, v in t.items() if not k.endswith("position_ids")}
    layers = len(_indices(t, r"encoder\.layers\.(\d+)\."))
    if drop_last:  # SD 2.x reads the penultimate layer: the last one is never used
        t = {k: v for k, v in t.items() if not k.startswith(f"encoder.layers.{layers - 1}.")}
        layers -= 1
    try:
        vocab, width = t["embeddings.token_embedding.weight"].shape
        positions = t["embeddings.position_embedding.weight"].shape[0]
        inner = t["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{what}: incomplete CLIP text encoder (no {e})") from None
    if len(tokenizer) > vocab:
        raise CheckpointError(
            f"{what}: the tokenizer has {len(tokenizer)} tokens, the text encoder {vocab}"
        )
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=positions,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    _load_strict(model, t, f"{what} (text encoder)")
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are still on meta
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise CheckpointError(f"{what}: cannot initialise the text encoder buffer {name}")
            owner, _, leaf = name.rpartition(".")
            ids = torch.arange(buf.shape[-1]).expand(buf.shape)
            model.get_submodule(owner).register_buffer(leaf, ids.clone(), persistent=False)
    return model


def load_single_file(
    path: str | Path,
    tokenizer: str | Path | None = None,
    prediction: str | None = None,
    image_size: int | None = None,
):
    """A single original SD 1.x / 2.x checkpoint -> Pipeline (float32, on the CPU)."""
    from .text import ClipEncoder

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
    _load_strict(unet, _rename(unet, u, lambda k: ldm_unet_key(k, unet_cfg), what), what)
    _load_strict(vae, _rename(vae, v, lambda k: ldm_vae_key(k, vae_cfg), what), what)
    tok = (
        _tokenizer_from_folder(tokenizer, pad)
        if tokenizer is not None
        else clip_tokenizer(pad_token=pad)
    )
    clip = _clip_from_state(text_state, tok, act, drop_last, what)
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
    return _pipeline(unet, vae, text, schedule, options, False, what)


def _check_alphas(alphas: Tensor | None, schedule: ScheduleConfig, what: str) -> None:
    """LDM checkpoints store their schedule's alphas_cumprod: it must be the one assumed."""
    if alphas is None:
        return
    from .schedule import NoiseSchedule

    ours = NoiseSchedule(schedule).alphas_cumprod
    if alphas.shape != ours.shape or (alphas.double() - ours).abs().max() > 1e-4:
        raise CheckpointError(
            f"{what}: its alphas_cumprod are not Stable Diffusion's scaled-linear schedule"
        )
