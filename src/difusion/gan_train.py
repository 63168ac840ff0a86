"""Training of the DCGAN baseline, with the run-folder conventions of diffusion runs.

The standard recipe: the non-saturating loss, Adam with lr 2e-4 and betas (0.5, 0.999) for
both networks, one discriminator step then one generator step per batch, and an optional EMA
of the generator (the weights that are saved for sampling). Like `train.train`: a
`--minutes` budget, a checkpoint at SIGINT/SIGTERM, exact resume, `--keep`, a guard against
non-finite losses, a failed write that keeps the last checkpoint whole, and a run folder with

    model.safetensors        the (EMA) generator, GANConfig as JSON in the metadata
    train_state.safetensors  G, D, both optimisers, every RNG and the place in the data:
                             exact --resume
    train_config.json        the GANTrainConfig (with "model": "gan")
    log.jsonl                {"step", "loss_d", "loss_g", "d_real", "d_fake", ...} lines
    loss.png                 the two losses along training
    samples/step_N.png       fixed-noise sample grids; samples.png at the end
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

from .batches import Batches, restore_stream, stream_metadata, training_batches
from .checkpoints import read_safetensors
from .configs import DictConfig
from .images import auto_scale, grid, to_pil
from .loop import Stop, TrainLoop
from .nn.gan import GAN, Discriminator, GANConfig, Generator, d_loss, g_loss, parameter_count
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


@dataclass
class GANTrainConfig(DictConfig):
    data: str = "digits"
    out: str = "runs/gan"
    size: int | None = None
    steps: int = 5000
    minutes: float | None = None  # wall-clock budget; the run stops and saves when it is spent
    batch_size: int = 64
    lr: float = 2e-4  # both networks
    beta1: float = 0.5
    beta2: float = 0.999
    z_dim: int = 100
    channels: int = 64  # generator's last hidden layer (g_channels)
    d_channels: int | None = None  # discriminator's first layer; None: same as channels
    ema_decay: float = 0.999  # EMA of the generator; 0 saves the raw generator
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep: int = 0  # step-numbered copies of the last `keep` checkpoints, in checkpoints/
    workers: int = 0  # DataLoader worker processes decoding the data (0: in the training one)
    model: str = "gan"  # marks the run folder's train_config.json


ARCHITECTURE = ("data", "out", "size", "z_dim", "channels", "d_channels")


def gan_config_for(cfg: GANTrainConfig, dataset: Dataset) -> GANConfig:
    try:
        return GANConfig(
            image_size=dataset.size,
            channels=dataset.channels,
            z_dim=cfg.z_dim,
            g_channels=cfg.channels,
            d_channels=cfg.d_channels or cfg.channels,
            data=cfg.data,
        )
    except ValueError as e:
        raise TrainingError(str(e)) from None


def save_gan_state(
    run: Run,
    step: int,
    cfg: GANTrainConfig,
    gen: Generator,
    disc: Discriminator,
    ema: GAN,
    opts: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    batches: Batches,
) -> None:
    tensors, metadata = training_state(
        {"g": gen.state_dict(), "d": disc.state_dict()}, opts, generators
    )
    metadata.update(
        step=str(step),
        train_config=json.dumps(cfg.to_dict()),
        model_config=json.dumps(gen.config.to_dict()),
        model="gan",
        **stream_metadata(batches),
    )
    write_model = lambda path: ema.save(path, {"step": str(step)})  # noqa: E731
    save_checkpoint(run, step, write_model, tensors, metadata, cfg.keep)


def load_gan_state(
    run: Run,
    gen: Generator,
    disc: Discriminator,
    opts: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    batches: Batches,
) -> int:
    tensors, metadata = read_safetensors(run.state_path)
    gen.load_state_dict(module_state(tensors, "g"))
    disc.load_state_dict(module_state(tensors, "d"))
    restore_training_state(tensors, metadata, opts, generators)
    restore_stream(batches, metadata)
    return int(metadata["step"])


def stored_gan_config(out: str | Path) -> GANTrainConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    if metadata.get("model") != "gan":
        raise TrainingError(f"{out} holds a diffusion run, not a GAN run: drop --model gan")
    return GANTrainConfig.from_dict(json.loads(metadata["train_config"]))


def plot_gan_loss(run: Run) -> None:
    keys = {"discriminator": "loss_d", "generator (non-saturating)": "loss_g"}
    plot_log(run.dir / "loss.png", run.read_log(), keys, "loss (mean between log steps)")


def gan_preview(ema: GAN, path: Path, seed: int = 0) -> None:
    """A fixed-noise grid of 36 samples, so grids from successive steps compare."""
    x = ema.sample(36, seed=seed)
    write_whole(path, grid(to_pil(x), cols=6, scale=auto_scale(ema.config.image_size, 64)).save)


def copy_buffers(ema: torch.nn.Module, model: torch.nn.Module) -> None:
    """The EMA generator's BatchNorm statistics are the trained generator's."""
    with torch.no_grad():
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def train_gan(
    cfg: GANTrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or continue) the GAN run in cfg.out; returns the folder.

    `on_step(step, {"loss_d", "loss_g", "d_real", "d_fake"})` is called after every step."""
    run, cfg, device, dataset = start_run(cfg, resume, stored_gan_config, ARCHITECTURE, dataset)
    config = gan_config_for(cfg, dataset)

    torch.manual_seed(cfg.seed)
    gen, disc = Generator(config).to(device), Discriminator(config).to(device)
    ema = GAN(config, copy.deepcopy(gen)).requires_grad_(False)
    betas = (cfg.beta1, cfg.beta2)
    opts = {
        "g": torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=betas),
        "d": torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=betas),
    }
    generators = seeded_generators(cfg.seed)
    batches = training_batches(
        dataset, cfg.batch_size, cfg.seed, generators["data"], device, workers=cfg.workers
    )
    stop = Stop(cfg.minutes)
    with stop.catching_signals(), run_folder_errors(run), contextlib.closing(batches):
        step = 0
        if resume:
            step = load_gan_state(run, gen, disc, opts, generators, batches)
            ema.generator.load_state_dict(read_safetensors(run.model_path)[0])
            run.truncate_log(step)
        write_run_config(run, cfg)

        if progress:
            print(
                f"training a DCGAN (G {parameter_count(gen) / 1e6:.2f}M, "
                f"D {parameter_count(disc) / 1e6:.2f}M parameters) on {cfg.data} "
                f"({len(dataset)} images, {dataset.size}x{dataset.size}) on {device}, "
                f"steps {step}->{cfg.steps}",
                flush=True,
            )
        loop = TrainLoop(run, step, cfg.steps, stop, cfg.log_every, progress, on_step)
        gen.train()
        disc.train()
        while loop.running():
            real = batches.next()["image"].to(device, non_blocking=True)
            z = torch.randn(cfg.batch_size, config.z_dim, generator=generators["noise"]).to(device)
            fake = gen(z)
            # discriminator: real -> 1, fake -> 0
            logits_real, logits_fake = disc(real), disc(fake.detach())
            loss_d = d_loss(logits_real, logits_fake)
            opts["d"].zero_grad(set_to_none=True)
            loss_d.backward()
            opts["d"].step()
            # generator: the non-saturating loss through the updated discriminator
            loss_g = g_loss(disc(fake))
            opts["g"].zero_grad(set_to_none=True)
            loss_g.backward()
            opts["g"].step()
            if cfg.ema_decay > 0:
                update_ema(ema.generator, gen, loop.step, cfg.ema_decay)
                copy_buffers(ema.generator, gen)
            else:
                ema.generator.load_state_dict(gen.state_dict())
            record = {
                "loss_d": loss_d,
                "loss_g": loss_g,
                "d_real": torch.sigmoid(logits_real.detach()).mean(),
                "d_fake": torch.sigmoid(logits_fake.detach()).mean(),
            }
            loop.advance(record, cfg.lr)  # tensors: watched on the device, not read back
            loop.verify_before(cfg.checkpoint_every, cfg.sample_every)
            if loop.due(cfg.checkpoint_every):
                save_gan_state(run, loop.step, cfg, gen, disc, ema, opts, generators, batches)
                loop.saved_step = loop.step
            if loop.due(cfg.sample_every):
                plot_gan_loss(run)
                gan_preview(ema, run.dir / "samples" / f"step_{loop.step:06d}.png")
        loop.close()
        if loop.step != loop.saved_step or not run.exists():
            save_gan_state(run, loop.step, cfg, gen, disc, ema, opts, generators, batches)
        plot_gan_loss(run)
        gan_preview(ema, run.dir / "samples.png")
        if progress:
            weights = "EMA generator" if cfg.ema_decay > 0 else "generator"
            print(
                f"stopped at step {loop.step} after {loop.elapsed() / 60:.1f} min; "
                f"{weights} in {run.model_path}"
            )
    stop.end_if_signalled(run, loop.step)
    return run.dir


SHARED_OPTIONS = (
    "data", "out", "size", "steps", "minutes", "batch_size", "lr", "ema_decay", "channels",
    "device", "seed", "sample_every", "checkpoint_every", "log_every", "keep", "workers",
)  # fmt: skip
NOT_FOR_GAN = (
    "warmup", "prediction", "schedule", "zero_terminal_snr", "min_snr_gamma", "cond",
    "text_encoder", "text_encoder_path", "cond_drop", "channel_mult", "attention",
    "layers_per_block", "dropout", "precision", "latent",
    "init", "data_option", "layout_map", "layout_steps", "crop", "flip", "buckets",
    "objective", "backbone", "patch_size", "depth", "head_dim",
)  # fmt: skip


def gan_config_from_cli(options: dict, command: Callable) -> GANTrainConfig:
    """`difusion train --model gan`: the options a GAN shares with a diffusion run make its
    configuration; a diffusion-only option given a value other than its default is an error.
    `options` are the command's arguments, `command` the command (for its defaults)."""
    return GANTrainConfig(**options_for_model("gan", options, command, SHARED_OPTIONS, NOT_FOR_GAN))


def train_from_cli(options: dict, command: Callable) -> None:
    """`difusion train --model gan`."""
    train_gan(gan_config_from_cli(options, command), resume=options["resume"])
