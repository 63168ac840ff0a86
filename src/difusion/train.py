"""One training loop for every diffusion model of the project.

The objective is DDPM's simple loss: pick t and eps at random, noise x0 in closed form, and
regress the network's output on eps (or v, or x0). Around it: AdamW with warm-up, gradient
clipping, an EMA of the weights (the one used for sampling), optional bf16/fp16 autocast,
exact resume, a guard against non-finite losses, and torch.distributed when run by torchrun.
A run stopped by its --minutes, SIGINT or SIGTERM saves the step it stopped at; one stopped
by a failed write (a full disk) keeps its last checkpoint whole.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from .batches import (
    Batches,
    restore_stream,
    stream_metadata,
    training_batches,
    training_generators,
)
from .checkpoints import CheckpointError, file_sha256, read_metadata, read_safetensors
from .configs import DictConfig
from .data import load_dataset
from .denoiser import PRECONDITIONED
from .errors import first_line
from .layout_fit import pretrain_layout
from .loop import Stop, TrainLoop
from .lora import adapter_state, add_trainable, load_adapter_state, save_run_model
from .model import BACKBONES, DiffusionModel, ModelConfig, resolve_checkpoint
from .nn.dit import DiTConfig
from .nn.unet import UNetConfig
from .objective import Draws, batch_cond, diffusion_loss
from .previews import alignment_probe, preview
from .runs import (
    Run,
    TrainingError,
    any_process,
    check_budget,
    check_run_folder,
    module_state,
    pick_device,
    restore_training_state,
    resumed_config,
    run_folder_errors,
    save_checkpoint,
    training_state,
    update_ema,
    write_run_config,
)
from .schedule import ScheduleConfig
from .sd import StableDiffusion

OBJECTIVES = ("ddpm", "edm", "flow")


@dataclass
class TrainConfig(DictConfig):
    data: str = "digits"
    out: str = "runs/run"
    size: int | None = None
    steps: int = 5000
    minutes: float | None = None  # wall-clock budget; the run stops and saves when it is spent
    batch_size: int = 64  # per process and accumulation step
    grad_accum: int = 1  # batches whose gradients add up to one optimisation step
    lr: float = 2e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prediction: str = "eps"
    objective: str = "ddpm"  # ddpm (eps/v/x0 on --schedule), edm or flow (schedule.py)
    backbone: str = "unet"  # or dit (nn/dit.py): width `channels`, heads of `head_dim`
    patch_size: int = 2  # dit: pixels a side of a patch
    depth: int = 6  # dit: transformer blocks
    schedule: str = "cosine"
    zero_terminal_snr: bool = False
    min_snr_gamma: float = 0.0  # Hang et al. 2023 loss weighting; 0 turns it off
    cond: str | None = None  # "label" (class-conditional) or "text"
    cond_drop: float = 0.1  # how often the condition is dropped (for classifier-free guidance)
    text_encoder: str = (
        "minilm"  # for cond="text": minilm, clip (with text_encoder_path) or scratch
    )
    text_encoder_path: str | None = None
    clip: str | None = None  # for cond="image" (unCLIP's decoder): the CLIP folder it sees through
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = (16, 8)
    layers_per_block: int = 2
    head_dim: int = 32
    dropout: float = 0.0
    layout_map: bool = False  # pixel places attend to the prompt (text models only)
    layout_steps: int = 2000  # steps fitting a new layout map to the images, before the rest
    layout_lr: float = 1e-3
    precision: str = "fp32"  # fp32, bf16 or fp16 (fp16 on CUDA only)
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep: int = 0  # step-numbered copies of the last `keep` checkpoints, in checkpoints/
    latent: str | None = None  # a VAE run folder or file: train in its latent space
    data_options: dict = field(default_factory=dict)  # keyword options of the data set
    workers: int = 0  # DataLoader worker processes decoding the data (0: in the training one)
    crop: str = "center"  # or "random": where the square is cut from a resized picture
    flip: bool = False  # random horizontal flips
    buckets: bool = False  # batches of one aspect-ratio bucket each, not squares
    compile: bool = False  # torch.compile the U-Net
    init: str | None = None  # fine-tune: start from this model's weights (and architecture)
    init_sha256: str | None = None  # the file `init` named, when the run started
    warm_start: str | None = None  # a model whose U-Net trunk starts this one (see warm_start)
    lora: int = 0  # > 0: train a LoRA adapter of this rank on the frozen `init` (see lora.py)
    lora_alpha: float | None = None  # its alpha (default: the rank)
    lora_targets: str = "attn"  # attn, attn+ff or all: the layers it adapts


def architecture_of(config: ModelConfig, downscale: int = 1) -> dict:
    """The TrainConfig fields that fix the model's weights' shapes, objective and condition,
    as they rebuild `config` (the inverse of `model_config_for`). The size is in image pixels:
    `downscale` of them a latent pixel (a latent model of ours says its own)."""
    latent = config.latent
    if latent is not None:
        if not latent.get("path"):
            raise TrainingError("--init: a latent model without its VAE's path")
        downscale = 2 ** (len(latent["vae"]["block_out_channels"]) - 1)
    unet, text = config.unet, config.text_encoder or {}
    base = unet.block_out_channels[0]
    objective = config.prediction if config.prediction in PRECONDITIONED else "ddpm"
    dit = {}
    if config.backbone == "dit":
        d = config.dit
        dit = {"channels": d.dim, "head_dim": d.attention_head_dim, "depth": d.num_layers,
               "patch_size": d.patch_size, "dropout": d.dropout}  # fmt: skip
    return {
        "objective": objective,
        "backbone": config.backbone,
        "size": config.image_size * downscale,
        "prediction": "eps" if objective != "ddpm" else config.prediction,
        "schedule": config.schedule.kind,
        "zero_terminal_snr": config.schedule.zero_terminal_snr,
        "cond": config.cond,
        "text_encoder": text.get("name", "minilm"),
        "text_encoder_path": text.get("path"),
        "channels": base,
        "channel_mult": tuple(c // base for c in unet.block_out_channels),
        "attention_resolutions": tuple(
            unet.sample_size // 2**i for i, a in enumerate(unet.attention_levels) if a
        ),
        "layers_per_block": unet.layers_per_block,
        "head_dim": unet.attention_head_dim,
        "dropout": unet.dropout,
        "layout_map": unet.layout_map,
        "latent": latent["path"] if latent else None,
        **dit,
    }


LAYOUT_MAP_NEEDS_TEXT = "--layout-map is for text-conditioned models"


def load_init(cfg: TrainConfig) -> tuple[TrainConfig, DiffusionModel, bool]:
    """`--init`: the model to fine-tune, `cfg` with that model's architecture, and whether
    its layout map is fitted alone first: with `--layout-map`, a map added to it, or its own
    map on this data's captions (new words, another language)."""
    try:
        path = resolve_checkpoint(cfg.init)
        model = DiffusionModel.load(path, text_encoder_path=cfg.text_encoder_path)
    except CheckpointError as e:
        raise TrainingError(f"--init: {e}") from None
    architecture = architecture_of(model.config)
    if cfg.layout_map and not architecture["layout_map"]:
        if model.config.cond != "text":
            raise TrainingError(LAYOUT_MAP_NEEDS_TEXT)
        model = with_layout_map(model)
        architecture["layout_map"] = True
    return replace(cfg, **architecture, init_sha256=file_sha256(path)), model, cfg.layout_map


# what a warm start takes from its model's architecture: all but the condition's
WARM_START_KEEPS = (
    "objective", "backbone", "size", "prediction", "schedule", "zero_terminal_snr", "channels",
    "channel_mult", "attention_resolutions", "layers_per_block", "head_dim", "dropout",
    "patch_size", "depth",
)  # fmt: skip


def load_warm_start(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """`--warm-start MODEL`: `cfg` with MODEL's U-Net architecture and objective, and MODEL's
    U-Net weights, for a new model whose condition (text encoder, image embedding, layout
    map) may differ: the tensors of the same name and shape start from MODEL's."""
    try:
        model = DiffusionModel.load(resolve_checkpoint(cfg.warm_start))
    except CheckpointError as e:
        raise TrainingError(f"--warm-start: {e}") from None
    architecture = architecture_of(model.config)
    kept = {k: v for k, v in architecture.items() if k in WARM_START_KEEPS}
    return replace(cfg, **kept), model.unet.state_dict()


def warm_started(diffusion: DiffusionModel, weights: dict, name: str) -> str:
    """Copies `weights` into the U-Net where name and shape match; says how much it took."""
    own = diffusion.unet.state_dict()
    taken = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    diffusion.unet.load_state_dict(taken, strict=False)
    share = sum(own[k].numel() for k in taken) / sum(v.numel() for v in own.values())
    return (
        f"warm start: {len(taken)} of {len(own)} tensors ({share:.1%} of the U-Net's "
        f"parameters) from {name}; {len(own) - len(taken)} fresh"
    )


def load_sd_init(cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, StableDiffusion]:
    """`--init` of a Stable Diffusion checkpoint (a diffusers folder or a single file): an
    adapter trained on its frozen U-Net, in its VAE's latents, at its resolution or `--size`.
    A resumed run reloads it, refused if it is no longer the same."""
    from .sd import load_checkpoint

    if not cfg.lora:
        raise TrainingError("--init: a Stable Diffusion checkpoint trains a LoRA: give --lora RANK")
    if cfg.layout_map:
        raise TrainingError("--layout-map is for models of ours, not a Stable Diffusion --init")
    try:
        sd = load_checkpoint(cfg.init)
    except (CheckpointError, ValueError, OSError) as e:
        raise TrainingError(f"--init: {first_line(e)}") from None
    digest = sd_sha256(Path(cfg.init))
    if resume and digest != cfg.init_sha256:
        raise TrainingError(f"--init {cfg.init}: not the checkpoint this run started from")
    architecture = architecture_of(sd.model.config, sd.vae.config.downscale)
    size = cfg.size or architecture["size"]
    return replace(cfg, **{**architecture, "size": size}, init_sha256=digest), sd


def sd_sha256(path: Path) -> str:
    """A Stable Diffusion checkpoint's identity: its file's, or its folder's U-Net weights'."""
    if path.is_dir():
        unet = path / "unet"
        path = next(iter(sorted(unet.glob("*.safetensors*"))), unet / "config.json")
    return file_sha256(path)


def uses_sd(cfg: TrainConfig) -> bool:
    """Whether a run adapts a Stable Diffusion checkpoint (whose base it does not save)."""
    from .sd import is_sd_checkpoint

    return cfg.init is not None and is_sd_checkpoint(cfg.init)


def check_sd_fits(cfg: TrainConfig, dataset: Dataset, sd: StableDiffusion) -> None:
    """The data's pictures are ones a Stable Diffusion U-Net and VAE take."""
    vae = sd.vae.config
    if dataset.channels != vae.in_channels:
        raise TrainingError(
            f"{cfg.data!r} has {dataset.channels}-channel images; the VAE of --init takes "
            f"{vae.in_channels}"
        )
    f = vae.downscale * 2 ** (len(sd.model.config.unet.block_out_channels) - 1)
    if dataset.size % f:
        raise TrainingError(
            f"image size {dataset.size} does not fit --init {cfg.init}: its sizes are "
            f"multiples of {f}"
        )


def restore_weights(model: DiffusionModel, state: dict[str, torch.Tensor]) -> None:
    """A model's weights, or (a Stable Diffusion run's state) its adapter's alone."""
    if state and all(".lora_" in k for k in state):
        load_adapter_state(model, state)
    else:
        model.load_weights(state)


def with_layout_map(model: DiffusionModel) -> DiffusionModel:
    """`model` with a layout map added to its attention, read through projections that are
    zero at first: the same function as `model` until it is trained."""
    unet = replace(model.config.unet, layout_map=True)
    out = DiffusionModel(replace(model.config, unet=unet), text_encoder=model.text_encoder)
    missing, unexpected = out.unet.load_state_dict(model.unet.state_dict(), strict=False)
    assert not unexpected and all("layout_" in k for k in missing), (missing, unexpected)
    return out


# what a fine-tuned model must share with its data and its rebuilt configuration
INIT_MUST_MATCH = (
    "unet", "dit", "backbone", "schedule", "prediction", "image_size", "channels", "cond", "class_names",
    "text_encoder", "latent",
)  # fmt: skip


def check_init_fits(init: DiffusionModel, rebuilt: ModelConfig, cfg: TrainConfig) -> None:
    a, b = init.config.to_dict(), rebuilt.to_dict()
    differ = [k for k in INIT_MUST_MATCH if a[k] != b[k]]
    if differ:
        raise TrainingError(
            f"--init {cfg.init}: the model does not fit {cfg.data!r} as configured "
            f"({', '.join(differ)} differ)"
        )


def build_text_encoder(cfg: TrainConfig, dataset: Dataset) -> torch.nn.Module:
    from .text import build_scratch_encoder, load_text_encoder

    if cfg.text_encoder == "scratch":
        n = min(len(dataset), 20_000)
        known = getattr(dataset, "captions", None)  # without decoding 20,000 images
        captions = list(known[:n]) if known else [dataset[i]["caption"] for i in range(n)]
        return build_scratch_encoder(captions)
    encoder = load_text_encoder(cfg.text_encoder, path=cfg.text_encoder_path)
    return encoder.requires_grad_(False)


def stored_scratch_encoder(run: Run) -> torch.nn.Module:
    """A run's scratch encoder with its stored vocabulary (its weights come with the state):
    a resumed run keeps its tokens whatever the data's captions are now."""
    from .text import ScratchConfig, ScratchEncoder

    spec = stored_model_config(run)["text_encoder"]
    return ScratchEncoder(ScratchConfig.from_dict(spec["config"]))


def stored_model_config(run: Run) -> dict:
    """The model configuration in a run's training state (read without its tensors)."""
    return json.loads(read_metadata(run.state_path)["model_config"])


def text_encoder_spec(encoder: torch.nn.Module, cfg: TrainConfig) -> dict:
    spec = {"name": encoder.name, "identity": encoder.identity()}
    if encoder.trainable:
        spec["config"] = encoder.config()
    if cfg.text_encoder_path:
        spec["path"] = str(cfg.text_encoder_path)
    return spec


def model_config_for(
    cfg: TrainConfig,
    dataset: Dataset,
    text_encoder: torch.nn.Module | None = None,
    latent: dict | None = None,
    image_encoder: torch.nn.Module | None = None,
) -> ModelConfig:
    """`latent` (from `vae_train.latent_spec`): the U-Net works on the VAE's latents.
    `image_encoder`: for cond="image", the CLIP whose image embeddings condition it."""
    if cfg.layout_map and latent is not None:
        raise TrainingError("--layout-map is fitted to pixels; it does not take --latent")
    size, channels = dataset.size, dataset.channels
    if latent is not None:
        vae = latent["vae"]
        f = 2 ** (len(vae["block_out_channels"]) - 1)
        if vae["in_channels"] != channels:
            raise TrainingError(
                f"the VAE takes {vae['in_channels']}-channel images; {cfg.data!r} has {channels}"
            )
        if size % f:
            raise TrainingError(f"image size {size} is not divisible by the VAE's downscale {f}")
        size, channels = size // f, vae["latent_channels"]
    levels = len(cfg.channel_mult)
    if cfg.backbone == "unet" and size % 2 ** (levels - 1):
        raise TrainingError(
            f"image size {size} is not divisible by 2^{levels - 1} for {levels} levels"
        )
    if cfg.backbone == "dit" and size % cfg.patch_size:
        raise TrainingError(
            f"image size {size} is not divisible by the patch size {cfg.patch_size}"
        )
    resolutions = [size // 2**i for i in range(levels)]
    asked = set(cfg.attention_resolutions)  # the default (16, 8): those of them there are
    chosen = asked != set(TrainConfig.attention_resolutions) and cfg.init is None  # not --init's
    if chosen and not asked <= set(resolutions):
        missing = sorted(asked - set(resolutions), reverse=True)
        raise TrainingError(
            f"--attention {','.join(map(str, missing))}: no level of this U-Net has that "
            f"resolution; its levels are {', '.join(map(str, resolutions))}"
        )
    check_condition_fits(cfg, dataset)
    num_classes = None
    class_names = None
    if cfg.cond == "label":
        class_names = list(dataset.class_names or map(str, range(dataset.num_classes)))
        num_classes = len(class_names) + 1  # the last one is "no label", for guidance
    if cfg.cond == "text" and text_encoder is None:
        raise TrainingError("--cond text needs a text encoder")
    embed_dim = image_encoder.embed_dim if cfg.cond == "image" else None
    unet = UNetConfig(
        in_channels=channels,
        out_channels=channels,
        sample_size=size,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.layers_per_block,
        attention_levels=tuple(r in cfg.attention_resolutions for r in resolutions),
        attention_head_dim=cfg.head_dim,
        dropout=cfg.dropout,
        norm_groups=min(32, cfg.channels),
        num_classes=num_classes,
        context_dim=text_encoder.dim if cfg.cond == "text" else embed_dim,
        layout_map=cfg.layout_map,
        image_embed_dim=embed_dim,
    )
    dit = None
    if cfg.backbone == "dit":
        if cfg.channels % cfg.head_dim:
            raise TrainingError(f"--channels {cfg.channels} is not a multiple of --head-dim")
        try:
            dit = DiTConfig(
                in_channels=channels, out_channels=channels, sample_size=size,
                patch_size=cfg.patch_size, num_layers=cfg.depth,
                num_attention_heads=cfg.channels // cfg.head_dim, attention_head_dim=cfg.head_dim,
                num_classes=num_classes, context_dim=unet.context_dim, dropout=cfg.dropout,
            )  # fmt: skip
        except ValueError as e:
            raise TrainingError(str(e)) from None
    return ModelConfig(
        unet=unet,
        backbone=cfg.backbone,
        dit=dit,
        schedule=schedule_config(cfg),
        prediction=cfg.objective if cfg.objective in PRECONDITIONED else cfg.prediction,
        # EDM's own sampler (Karras et al.: 18 Heun steps, 35 evaluations, on Karras sigmas)
        sampler="heun_edm" if cfg.objective == "edm" else "dpmpp_2m",
        steps=18 if cfg.objective == "edm" else 20,
        spacing="karras" if cfg.objective == "edm" else "trailing",
        image_size=size,
        channels=channels,
        cond=cfg.cond,
        class_names=class_names,
        text_encoder=text_encoder_spec(text_encoder, cfg) if cfg.cond == "text" else None,
        clip_x0=latent is None,
        latent=latent,
        clip=image_encoder.spec if cfg.cond == "image" else None,
    )


def schedule_config(cfg: TrainConfig) -> ScheduleConfig:
    """The ddpm objective's --schedule, or the edm or flow process."""
    if cfg.objective == "ddpm":
        return ScheduleConfig(kind=cfg.schedule, zero_terminal_snr=cfg.zero_terminal_snr)
    return ScheduleConfig(kind=cfg.objective)


def check_objective(cfg: TrainConfig) -> None:
    """The objective and backbone exist, and the options given fit them."""
    if cfg.objective not in OBJECTIVES:
        raise TrainingError(f"unknown objective {cfg.objective!r}; choose ddpm, edm or flow")
    if cfg.backbone not in BACKBONES:
        raise TrainingError(f"unknown backbone {cfg.backbone!r}; choose unet or dit")
    if cfg.objective != "ddpm":
        fixed = [
            name
            for name, given, default in (
                ("--prediction", cfg.prediction, "eps"),
                ("--min-snr-gamma", cfg.min_snr_gamma, 0.0),
                ("--zero-terminal-snr", cfg.zero_terminal_snr, False),
            )
            if given != default
        ]
        if fixed:
            raise TrainingError(
                f"{', '.join(fixed)}: for --objective ddpm; {cfg.objective} sets its own"
            )
    if cfg.backbone == "dit" and cfg.layout_map:
        raise TrainingError("--layout-map is a U-Net's; the dit backbone does not take it")
    if cfg.backbone == "dit" and cfg.depth < 1:
        raise TrainingError(f"--depth must be 1 or more, not {cfg.depth}")


def check_condition_fits(cfg: TrainConfig, dataset: Dataset) -> None:
    """The condition asked for is one the data has: labels, or captions."""
    if cfg.cond not in (None, "label", "text", "image"):
        raise TrainingError(f"unknown condition {cfg.cond!r}; choose label or text")
    if cfg.cond == "image" and cfg.clip is None:
        raise TrainingError("an unCLIP decoder needs the CLIP folder it is conditioned through")
    if cfg.cond == "label" and not getattr(dataset, "num_classes", None):
        raise TrainingError(f"--cond label needs labelled data; {cfg.data!r} has no labels")
    if cfg.layout_map and cfg.cond != "text":
        raise TrainingError(LAYOUT_MAP_NEEDS_TEXT)
    if cfg.cond == "text" and (len(dataset) == 0 or "caption" not in dataset[0]):
        raise TrainingError(f"--cond text needs captioned data; {cfg.data!r} has no captions")


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def save_state(
    run: Run,
    step: int,
    cfg: TrainConfig,
    model: DiffusionModel,
    ema: DiffusionModel,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    batches: Batches,
) -> None:
    sd = uses_sd(cfg)
    modules = {"model": adapter_state(model) if sd else model.weights()}
    if cfg.lora:  # the adapter's EMA (the model file holds it merged into the base)
        modules["ema_lora"] = adapter_state(ema)
    tensors, metadata = training_state(modules, {"model": opt}, generators)
    metadata.update(
        step=str(step),
        train_config=json.dumps(cfg.to_dict()),
        model_config=json.dumps(model.config.to_dict()),
        **stream_metadata(batches),
    )
    if cfg.lora:
        base = str(Path(cfg.init).resolve()) if sd else None
        write_model = lambda path: save_run_model(ema, path, step, base)  # noqa: E731
    else:
        write_model = lambda path: ema.save(path, {"step": str(step)})  # noqa: E731
    save_checkpoint(run, step, write_model, tensors, metadata, cfg.keep)


def load_state(
    run: Run,
    model: DiffusionModel,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    batches: Batches,
) -> int:
    """The step a run stopped at, with its weights, optimizer, generators and place in the
    data restored (a run saved before the data's place was kept starts its data afresh)."""
    tensors, metadata = read_safetensors(run.state_path)
    restore_weights(model, module_state(tensors, "model"))
    restore_training_state(tensors, metadata, {"model": opt}, generators)
    restore_stream(batches, metadata)
    return int(metadata["step"])


def ema_weights(run: Run, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The EMA weights a run resumes with: its model file's, or a LoRA run's base (from the
    training state) with the adapter's EMA."""
    if not cfg.lora:
        return read_safetensors(run.model_path)[0]
    tensors = read_safetensors(run.state_path)[0]
    return {**module_state(tensors, "model"), **module_state(tensors, "ema_lora")}


def stored_train_config(out: str | Path) -> TrainConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    stored = json.loads(metadata.get("train_config", "{}"))
    if stored.get("model") in ("gan", "vae") or "model_config" not in metadata:
        raise TrainingError(f"{out} is not a diffusion run (a GAN run resumes with --model gan)")
    return TrainConfig.from_dict(stored)


def start_line(
    cfg: TrainConfig,
    diffusion: DiffusionModel,
    dataset: Dataset,
    device: torch.device,
    world: int,
    step: int,
) -> str:
    """What a run trains, on what, and its global batch and learning rate."""
    params = sum(p.numel() for p in diffusion.unet.parameters())
    total = cfg.batch_size * world * cfg.grad_accum
    parts = [f"{cfg.batch_size} per batch"]
    if world > 1:
        parts.append(f"x {world} processes")
    if cfg.grad_accum > 1:
        parts.append(f"x {cfg.grad_accum} accumulated batches")
    return (
        f"training {params / 1e6:.2f}M parameters on {cfg.data} ({len(dataset)} images, "
        + (f"{skipped} skipped, " if (skipped := getattr(dataset, "skipped", 0)) else "")
        + f"{dataset.size}x{dataset.size}) on {device}"
        + (f" x{world} processes" if world > 1 else "")
        + f", steps {step}->{cfg.steps}; global batch {total} ({' '.join(parts)}), "
        f"lr {cfg.lr:g}"
    )


def mean_over_processes(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` averaged over the processes of the group (on the host)."""
    values = values.to(device)
    dist.all_reduce(values)
    return (values / dist.get_world_size()).cpu()


def tracks_alignment(cfg: TrainConfig) -> bool:
    return cfg.data == "shapes" and cfg.cond == "text" and cfg.latent is None


def check_options(cfg: TrainConfig) -> None:
    """The options whose values alone can be wrong, each refused in one line."""
    check_budget(cfg)
    check_objective(cfg)
    if cfg.layout_steps < 0:
        raise TrainingError(f"--layout-steps must be 0 or more, not {cfg.layout_steps}")
    if cfg.keep < 0:
        raise TrainingError(f"--keep must be 0 or more, not {cfg.keep}")
    if cfg.grad_accum < 1:
        raise TrainingError(f"--grad-accum must be 1 or more, not {cfg.grad_accum}")
    if cfg.lora and cfg.init is None:
        raise TrainingError("--lora trains an adapter for a model: name it with --init MODEL")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"unknown precision {cfg.precision!r}; choose fp32, bf16 or fp16")


def build_model(
    cfg: TrainConfig, run: Run, resume: bool, dataset: Dataset | None, rank: int
) -> tuple[TrainConfig, Dataset, DiffusionModel, torch.nn.Module | None, bool]:
    """The model a run trains, on the CPU: new, fine-tuned from `--init` (ours or a Stable
    Diffusion checkpoint), warm-started, or as a resumed run left it; with its encoders, its
    VAE (None for pixels) and a LoRA adapter where asked. Returns the configuration as the
    model's source completed it, the data set, the model, the VAE and whether a new layout
    map is to be fitted first."""
    init, sd, fit_layout = None, None, cfg.layout_map and not resume
    if uses_sd(cfg):
        cfg, sd = load_sd_init(cfg, resume)
        init = sd.model
    elif cfg.init is not None and not resume:
        cfg, init, fit_layout = load_init(cfg)
    warm = None
    if cfg.warm_start is not None and not resume:
        if cfg.init is not None:
            raise TrainingError(
                "--init fine-tunes a model, --warm-start starts a new one: give one"
            )
        cfg, warm = load_warm_start(cfg)
    if dataset is None:
        dataset = load_dataset(cfg.data, cfg.size, **cfg.data_options)
    check_condition_fits(cfg, dataset)

    torch.manual_seed(cfg.seed + rank)
    text_encoder = None
    if init is not None:
        text_encoder = init.text_encoder
    elif resume and cfg.cond == "text" and cfg.text_encoder == "scratch":
        text_encoder = stored_scratch_encoder(run)
    elif cfg.cond == "text":
        text_encoder = build_text_encoder(cfg, dataset)
    image_encoder = None
    if cfg.cond == "image":
        from .unclip import check_clip, frozen_clip

        image_encoder = frozen_clip(cfg.clip)
        if resume:  # the run continues only through the CLIP it started with
            check_clip(image_encoder, stored_model_config(run).get("clip"), "decoder run")
    vae, latent = (sd.vae if sd else None), None
    if cfg.latent is not None:
        from .vae_train import latent_spec

        latent, vae = latent_spec(cfg.latent)
        if resume:  # the run continues only with the VAE it started with
            stored_latent = stored_model_config(run).get("latent") or {}
            if stored_latent.get("sha256") != latent["sha256"]:
                raise TrainingError(
                    f"{cfg.latent}: not the VAE this run was trained with (sha256 differs)"
                )
    if sd is not None:  # its own configuration, not one of ours to rebuild
        check_sd_fits(cfg, dataset, sd)
        side = dataset.size // vae.config.downscale  # previews at the training size
        init.config = replace(init.config, image_size=side)
        diffusion = init.train()
    else:
        model_config = model_config_for(cfg, dataset, text_encoder, latent, image_encoder)
        if init is not None:
            check_init_fits(init, model_config, cfg)
            diffusion = init.train()
        else:
            diffusion = DiffusionModel(
                model_config, text_encoder=text_encoder, image_encoder=image_encoder
            )
        if warm is not None:
            taken = warm_started(diffusion, warm, cfg.warm_start)
            if rank == 0:
                print(taken, file=sys.stderr, flush=True)
    if cfg.lora:  # the base frozen, an adapter to train (its weights come back on resume)
        add_trainable(diffusion, cfg.lora, cfg.lora_alpha, cfg.lora_targets)
    return cfg, dataset, diffusion, vae, fit_layout


def train(
    cfg: TrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (or continue) the run in cfg.out; returns the folder."""
    run = Run(cfg.out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    check_run_folder(run, resume)
    if resume:
        cfg = resumed_config(cfg, stored_train_config(run.dir))
    check_options(cfg)
    device = pick_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 training needs a CUDA device; use bf16 on a CPU")
    cfg, dataset, diffusion, vae, fit_layout = build_model(cfg, run, resume, dataset, rank)
    # channels_last: on CPU, oneDNN's NCHW kernels are up to 17x slower for 32-channel convs
    diffusion = diffusion.to(device, memory_format=torch.channels_last)
    vae = vae.to(device) if vae is not None else None
    trainable = [p for p in diffusion.parameters() if p.requires_grad]
    # before the clock starts: the first AdamW of a process imports torch._dynamo (about 2 s)
    opt = torch.optim.AdamW(
        trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True
    )
    stop = Stop(cfg.minutes)  # the budget covers the layout map's pre-fit too
    with contextlib.ExitStack() as cleanup, stop.catching_signals(), run_folder_errors(run):
        if fit_layout and cfg.layout_steps > 0 and rank == 0:
            run.dir.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(cfg.seed + 7919)
            pretrain_layout(diffusion, dataset, cfg, generator, run, progress, stop)
        # frozen weights (an adapter's base, a frozen text encoder) are shared, not copied:
        # the EMA never moves them, and Stable Diffusion's would double the memory
        frozen = {id(p): p for p in diffusion.parameters() if not p.requires_grad}
        ema = copy.deepcopy(diffusion, memo=frozen).requires_grad_(False)
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        generators = training_generators(cfg.seed, rank, gen_device)
        multiple = 2 ** (len(cfg.channel_mult) - 1) if cfg.backbone == "unet" else cfg.patch_size
        multiple *= vae.config.downscale if vae else 1
        batches = training_batches(
            dataset, cfg.batch_size, cfg.seed, generators["data"], device, rank=rank, world=world,
            workers=cfg.workers, crop=cfg.crop, flip=cfg.flip, buckets=cfg.buckets,
            multiple=multiple,
        )  # fmt: skip
        cleanup.callback(batches.close)  # its worker processes, however the run ends
        step = 0
        if resume:
            step = load_state(run, diffusion, opt, generators, batches)
            restore_weights(ema, ema_weights(run, cfg))
            if rank == 0:
                run.truncate_log(step)
        run.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_run_config(run, cfg)

        net: torch.nn.Module = diffusion.unet
        if cfg.compile:  # CUDA graphs where every step has the same shapes
            static = device.type == "cuda" and not distributed and not cfg.buckets
            net = torch.compile(net, mode="reduce-overhead" if static else "default")
        if distributed:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None
            )
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        if rank == 0 and progress:
            print(start_line(cfg, diffusion, dataset, device, world, step), flush=True)
        loop = TrainLoop(
            run, step, cfg.steps, stop, cfg.log_every, rank == 0 and progress,
            on_step=(lambda s, record: on_step(s, record["loss"])) if on_step else None,
            write_log=rank == 0,
            agree=(lambda wish: any_process(wish, device)) if distributed else None,
            reduce=(lambda means: mean_over_processes(means, device)) if distributed else None,
        )  # fmt: skip
        diffusion.train()
        parts = world * cfg.grad_accum  # the batches of a step, over processes and accumulation
        compiled_at = loop.step + 1 if cfg.compile else None
        saving = drawing = 0.0  # seconds the last checkpoint and grid (and probe) took
        while loop.running():
            started = time.monotonic()
            lr = lr_at(loop.step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss, draws = torch.zeros((), device=device), None
            for micro in range(cfg.grad_accum):
                batch = batches.next()
                x0 = batch["image"].to(device, non_blocking=True)
                if vae is not None:  # latents: a posterior sample, scaled to about unit variance
                    with torch.no_grad():
                        x0 = vae.encode_latents(x0, generator=generators["data"])
                x0 = x0.contiguous(memory_format=torch.channels_last)
                b = x0.shape[0]
                if (
                    draws is None
                    or draws.noise.shape[1:] != x0.shape[1:]
                    or b * parts != len(draws.t)
                ):
                    # once a step (again for a batch of another size: a bucket's last)
                    draws = Draws.make(
                        diffusion, x0, parts, generators["noise"], generators["cond"], cfg.cond_drop
                    )
                mine = draws.share(micro * world + rank, b)
                cond = batch_cond(
                    batch, diffusion, cfg.cond_drop, generators["cond"], device, mine.dropped
                )
                last = micro == cfg.grad_accum - 1
                # under DDP, gradients are averaged over the processes at the last batch only
                with net.no_sync() if distributed and not last else contextlib.nullcontext():
                    with torch.autocast(
                        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                    ):
                        micro_loss = diffusion_loss(
                            net, diffusion, x0, cond, generators["noise"], cfg.min_snr_gamma, mine
                        )
                    scaler.scale(micro_loss / cfg.grad_accum).backward()
                loss += micro_loss.detach() / cfg.grad_accum
            scaler.unscale_(opt)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            update_ema(ema, diffusion, loop.step, cfg.ema_decay)
            loop.advance({"loss": loss}, lr)
            if loop.step == compiled_at and rank == 0 and progress:
                took = time.monotonic() - started
                print(f"compiled (first step: {took:.1f} s)", file=sys.stderr, flush=True)
            loop.verify_before(cfg.checkpoint_every, cfg.sample_every)
            if rank != 0:
                continue
            started = time.monotonic()
            if loop.due(cfg.checkpoint_every):
                save_state(run, loop.step, cfg, diffusion, ema, opt, generators, batches)
                loop.saved_step = loop.step
                saving = time.monotonic() - started
            if loop.due(cfg.sample_every):
                started = time.monotonic()
                run.plot_loss()
                preview(ema, run.dir / "samples" / f"step_{loop.step:06d}.png", vae=vae)
                if vae is None and tracks_alignment(cfg):
                    run.append_log({"step": loop.step, **alignment_probe(ema)})
                    run.plot_alignment()
                drawing = time.monotonic() - started
            # kept back from the budget: the end of the run saves and draws again, and the
            # next step may do either first
            due = [
                (loop.step + 1) % every == 0 for every in (cfg.checkpoint_every, cfg.sample_every)
            ]
            stop.reserve = saving * (1 + due[0]) + drawing * (1 + due[1])
        loop.close()
        step = loop.step
        if rank == 0 and (step != loop.saved_step or not run.exists()):
            save_state(run, step, cfg, diffusion, ema, opt, generators, batches)
        if rank == 0:
            run.plot_loss()
            preview(ema, run.dir / "samples.png", vae=vae)
            if progress:
                print(
                    f"stopped at step {step} after {loop.elapsed() / 60:.1f} min; "
                    f"EMA weights in {run.model_path}"
                )

    if distributed:
        dist.barrier()
    stop.end_if_signalled(run, loop.step, report=rank == 0)
    return run.dir
