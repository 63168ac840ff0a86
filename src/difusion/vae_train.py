"""Training of the KL autoencoder of latent diffusion, with the run-folder conventions of
diffusion runs, and the VAE side of latent diffusion (the VAE file and its identity).

The objective is `vae_loss` (L1 reconstruction + a small KL), AdamW, an EMA of the weights
(the one saved), a `--minutes` budget, a checkpoint at SIGINT/SIGTERM, exact resume, `--keep`,
a guard against non-finite losses and a failed write that keeps the last checkpoint whole.
After training the latent std is measured on data batches and `scaling_factor = 1 / std` is
stored in the VAEConfig, so the latents a diffusion model sees have about unit variance.

    model.safetensors        the (EMA) VAE, VAEConfig as JSON in the metadata ("difusion-vae/1")
    train_state.safetensors  VAE, optimiser, every RNG and the place in the data: exact --resume
    train_config.json        the VAETrainConfig (with "model": "vae")
    log.jsonl                {"step", "loss", "rec", "kl", "lr", "steps_per_s"} lines
    loss.png                 the loss along training
    samples/step_N.png       reconstructions (top: data, bottom: EMA VAE); reconstructions.png
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .batches import restore_stream, stream_metadata, training_batches
from .checkpoints import CheckpointError, atomic_save, file_sha256, read_safetensors
from .configs import DictConfig
from .data import collate, random_batch
from .errors import first_line
from .images import auto_scale, grid, to_pil
from .loop import Stop, TrainLoop
from .nn.vae import AutoencoderKL, VAEConfig, vae_loss
from .runs import (
    Run,
    TrainingError,
    module_state,
    options_for_model,
    plot_log,
    restore_training_state,
    run_folder_errors,
    save_checkpoint,
    seeded_generators,
    start_run,
    training_state,
    update_ema,
    write_run_config,
    write_whole,
)

FORMAT = "difusion-vae/1"


@dataclass
class VAETrainConfig(DictConfig):
    data: str = "digits"
    out: str = "runs/vae"
    size: int | None = None
    steps: int = 5000
    minutes: float | None = None
    batch_size: int = 64
    lr: float = 2e-4
    kl_weight: float = 1e-6  # LDM's weighting (see vae_loss)
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level each; downscale f = 2^(levels - 1)
    layers_per_block: int = 1
    latent_channels: int = 4
    ema_decay: float = 0.999
    scale_batches: int = 8  # data batches the latent std (scaling factor) is measured on
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep: int = 0  # step-numbered copies of the last `keep` checkpoints, in checkpoints/
    workers: int = 0  # DataLoader worker processes decoding the data (0: in the training one)
    model: str = "vae"  # marks the run folder's train_config.json


ARCHITECTURE = (
    "data", "size", "kl_weight", "channels", "channel_mult", "layers_per_block",
    "latent_channels", "lr", "batch_size", "ema_decay", "seed", "scale_batches",
)  # fmt: skip


# --- the VAE file -----------------------------------------------------------------------------


def save_vae(vae: AutoencoderKL, path: str | Path, extra_metadata: dict | None = None) -> None:
    metadata = {"format": FORMAT, "config": json.dumps(vae.config.to_dict())}
    metadata.update(extra_metadata or {})
    state = {k: v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()}
    atomic_save(state, path, metadata)


def resolve_vae(path: str | Path) -> Path:
    """A VAE run folder or file -> the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such VAE file (give a VAE run folder or its file)")
    return path


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    path = resolve_vae(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not a difusion VAE file (format {FORMAT})")
    try:
        config = VAEConfig.from_dict(json.loads(metadata["config"]))
        vae = AutoencoderKL(config)
        vae.load_state_dict(tensors)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the VAE does not load ({first_line(e)})") from None
    return vae.to(device).eval().requires_grad_(False)


def latent_spec(path: str | Path) -> tuple[dict, AutoencoderKL]:
    """What a latent diffusion model records of its VAE (config, sha256, path), and the VAE."""
    path = resolve_vae(path)
    vae = load_vae(path)
    spec = {"vae": vae.config.to_dict(), "sha256": file_sha256(path), "path": str(path.resolve())}
    return spec, vae


def vae_for(spec: dict, device: str | torch.device = "cpu", path: str | None = None):
    """The VAE a latent model was trained with, refused if its file is not the same one."""
    where = path or spec.get("path")
    if not where:
        raise CheckpointError("latent model without a VAE path in its configuration")
    file = resolve_vae(where)
    digest = file_sha256(file)
    if digest != spec.get("sha256"):
        raise CheckpointError(
            f"{file}: not the VAE this model was trained with "
            f"(sha256 {digest[:12]}, expected {str(spec.get('sha256'))[:12]})"
        )
    return load_vae(file, device)


# --- training ---------------------------------------------------------------------------------


def vae_config_for(cfg: VAETrainConfig, dataset: Dataset) -> VAEConfig:
    chans = tuple(cfg.channels * m for m in cfg.channel_mult)
    groups = min(32, cfg.channels)
    if any(c % groups for c in chans):
        raise TrainingError(f"channels {chans} are not divisible into {groups} norm groups")
    config = VAEConfig(
        in_channels=dataset.channels,
        out_channels=dataset.channels,
        latent_channels=cfg.latent_channels,
        block_out_channels=chans,
        layers_per_block=cfg.layers_per_block,
        norm_groups=groups,
        scaling_factor=1.0,
        sample_size=dataset.size,
    )
    if dataset.size % config.downscale:
        raise TrainingError(
            f"image size {dataset.size} is not divisible by the VAE's downscale {config.downscale}"
        )
    return config


def save_vae_state(run, step, cfg, vae, ema, opt, generators, batches) -> None:
    tensors, metadata = training_state({"vae": vae.state_dict()}, {"vae": opt}, generators)
    metadata.update(
        step=str(step),
        train_config=json.dumps(cfg.to_dict()),
        model_config=json.dumps(vae.config.to_dict()),
        model="vae",
        **stream_metadata(batches),
    )
    write_model = lambda path: save_vae(ema, path, {"step": str(step)})  # noqa: E731
    save_checkpoint(run, step, write_model, tensors, metadata, cfg.keep)


def stored_vae_config(out: str | Path) -> VAETrainConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    if metadata.get("model") != "vae":
        raise TrainingError(f"{out} does not hold a VAE run: drop --model vae")
    return VAETrainConfig.from_dict(json.loads(metadata["train_config"]))


@torch.no_grad()
def measure_scaling_factor(
    vae: AutoencoderKL, dataset: Dataset, batches: int, batch_size: int, seed: int = 0
) -> float:
    """1 / std of the (unscaled, shift-free) posterior samples over some data batches."""
    g = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    zs = []
    for _ in range(max(1, batches)):
        x = random_batch(dataset, batch_size, g)["image"].to(device)
        zs.append(vae.encode(x).sample(g).float().cpu())
    std = torch.cat(zs).std().item()
    if not std > 0 or not torch.isfinite(torch.tensor(std)):
        raise TrainingError(f"latent std is {std}: cannot set a scaling factor")
    return 1.0 / std


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, dataset: Dataset, path: Path, n: int = 8) -> None:
    x = collate([dataset[i] for i in range(min(n, len(dataset)))])["image"]
    x = x.to(next(vae.parameters()).device)
    recon = vae(x, sample_posterior=False)[0].clamp(-1, 1)
    images = to_pil(torch.cat([x, recon]))
    write_whole(path, grid(images, cols=len(x), scale=auto_scale(dataset.size, 64)).save)


def plot_vae_loss(run: Run) -> None:
    keys = {"loss (L1 + KL term)": "loss", "L1 reconstruction": "rec"}
    plot_log(run.dir / "loss.png", run.read_log(), keys, "per-value error", log=True)


def train_vae(
    cfg: VAETrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or continue) the VAE run in cfg.out; returns the folder."""
    run, cfg, device, dataset = start_run(cfg, resume, stored_vae_config, ARCHITECTURE, dataset)
    config = vae_config_for(cfg, dataset)

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(config).to(device)
    ema = copy.deepcopy(vae).requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    generators = seeded_generators(cfg.seed)
    batches = training_batches(
        dataset, cfg.batch_size, cfg.seed, generators["data"], device, workers=cfg.workers
    )
    stop = Stop(cfg.minutes)
    with stop.catching_signals(), run_folder_errors(run), contextlib.closing(batches):
        step = 0
        if resume:
            tensors, metadata = read_safetensors(run.state_path)
            vae.load_state_dict(module_state(tensors, "vae"))
            restore_training_state(tensors, metadata, {"vae": opt}, generators)
            restore_stream(batches, metadata)
            step = int(metadata["step"])
            ema.load_state_dict(read_safetensors(run.model_path)[0])
            run.truncate_log(step)
        write_run_config(run, cfg)
        if progress:
            params = sum(p.numel() for p in vae.parameters())
            print(
                f"training a KL autoencoder ({params / 1e6:.2f}M parameters, "
                f"f={config.downscale}, {config.latent_channels} latent channels) on {cfg.data} "
                f"({len(dataset)} images, {dataset.size}x{dataset.size}) on {device}, "
                f"steps {step}->{cfg.steps}",
                flush=True,
            )
        loop = TrainLoop(run, step, cfg.steps, stop, cfg.log_every, progress, on_step)
        vae.train()
        while loop.running():
            x = batches.next()["image"].to(device, non_blocking=True)
            loss, parts = vae_loss(vae, x, cfg.kl_weight, generator=generators["noise"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, vae, loop.step, cfg.ema_decay)
            loop.advance(parts, cfg.lr)  # the loss first: a non-finite stop names it
            loop.verify_before(cfg.checkpoint_every, cfg.sample_every)
            if loop.due(cfg.checkpoint_every):
                save_vae_state(run, loop.step, cfg, vae, ema, opt, generators, batches)
                loop.saved_step = loop.step
            if loop.due(cfg.sample_every):
                plot_vae_loss(run)
                reconstruction_grid(ema, dataset, run.dir / "samples" / f"step_{loop.step:06d}.png")
        loop.close()
        step = loop.step
        # the scaling factor of the EMA weights that are saved, then the final files
        ema.eval()
        ema.config.scaling_factor = measure_scaling_factor(
            ema, dataset, cfg.scale_batches, cfg.batch_size, seed=cfg.seed
        )
        save_vae_state(run, step, cfg, vae, ema, opt, generators, batches)
        plot_vae_loss(run)
        reconstruction_grid(ema, dataset, run.dir / "reconstructions.png")
        if progress:
            print(
                f"stopped at step {step} after {loop.elapsed() / 60:.1f} min; scaling factor "
                f"{ema.config.scaling_factor:.4f}; EMA VAE in {run.model_path}"
            )
    stop.end_if_signalled(run, step)
    return run.dir


SHARED_OPTIONS = (
    "data", "out", "size", "steps", "minutes", "batch_size", "lr", "ema_decay", "channels",
    "layers_per_block", "device", "seed", "sample_every", "checkpoint_every", "log_every", "keep",
    "workers",
)  # fmt: skip
NOT_FOR_VAE = (
    "warmup", "prediction", "schedule", "zero_terminal_snr", "min_snr_gamma", "cond",
    "text_encoder", "text_encoder_path", "cond_drop", "attention", "dropout", "precision",
    "latent", "init", "data_option", "layout_map", "layout_steps", "crop", "flip", "buckets",
    "objective", "backbone", "patch_size", "depth", "head_dim",
)  # fmt: skip


def vae_config_from_cli(options: dict, command: Callable) -> VAETrainConfig:
    """`difusion train --model vae`: the shared options make its configuration (with
    `--channel-mult` giving its levels); a diffusion-only option set is an error."""
    shared = options_for_model("vae", options, command, SHARED_OPTIONS, NOT_FOR_VAE)
    if "channel_mult" in options:
        try:
            shared["channel_mult"] = tuple(int(v) for v in str(options["channel_mult"]).split(","))
        except ValueError:
            raise TrainingError(f"--channel-mult: bad list {options['channel_mult']!r}") from None
    return VAETrainConfig(**shared)


def train_from_cli(options: dict, command: Callable) -> None:
    """`difusion train --model vae`."""
    train_vae(vae_config_from_cli(options, command), resume=options["resume"])
