"""Training of unCLIP's prior (prior.py) on captioned images seen through a frozen CLIP, with
the run-folder conventions of every trainer (EMA, --minutes, signals, exact resume, --keep).

Each step embeds the batch's images and captions with the CLIP, drops a caption to the empty
prompt with probability `cond_drop` (classifier-free guidance), and regresses the prior's x0
estimate on the image embedding. Every `sample_every` steps the log gets `probe_cos`: the mean
cosine between the image embeddings the prior draws for fixed held-out captions and those of
their own images (and `probe_text_cos`, the same for the caption's text embedding, for scale).

    model.safetensors        the (EMA) prior, PriorConfig as JSON in the metadata
    train_state.safetensors  prior, optimiser, every RNG and the place in the data
    train_config.json        the PriorTrainConfig (with "model": "prior")
    log.jsonl, loss.png      the loss and the probe along training
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .batches import restore_stream, stream_metadata, training_batches, training_generators
from .checkpoints import read_safetensors
from .configs import DictConfig
from .data import collate, load_dataset
from .loop import Stop, TrainLoop
from .prior import Prior, PriorConfig, text_cond
from .runs import (
    Run,
    TrainingError,
    module_state,
    options_for_model,
    plot_log,
    restore_training_state,
    run_folder_errors,
    save_checkpoint,
    start_run,
    training_state,
    update_ema,
    write_run_config,
)
from .unclip import check_clip, frozen_clip


@dataclass
class PriorTrainConfig(DictConfig):
    data: str = "shapes"
    clip: str = ""  # the CLIP folder (required)
    out: str = "runs/prior"
    size: int | None = None
    steps: int = 5000
    minutes: float | None = None
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 200
    cond_drop: float = 0.1
    width: int = 256
    layers: int = 4
    heads: int = 4
    ema_decay: float = 0.999
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep: int = 0
    workers: int = 0
    data_options: dict = field(default_factory=dict)
    model: str = "prior"  # marks the run folder's train_config.json


ARCHITECTURE = (
    "data", "clip", "size", "lr", "warmup", "cond_drop", "width", "layers", "heads", "batch_size",
    "ema_decay", "seed", "data_options",
)  # fmt: skip
PROBE = 64  # held-out captions the probe draws embeddings for


def stored_prior_config(out: str | Path) -> PriorTrainConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    if metadata.get("model") != "prior":
        raise TrainingError(f"{out} does not hold a prior run: drop --model prior")
    return PriorTrainConfig.from_dict(json.loads(metadata["train_config"]))


def save_prior_state(run, step, cfg, prior, ema, opt, generators, batches) -> None:
    tensors, metadata = training_state(
        {"prior": prior.net.state_dict()}, {"prior": opt}, generators
    )
    metadata.update(
        step=str(step), train_config=json.dumps(cfg.to_dict()), model="prior",
        **stream_metadata(batches),
    )  # fmt: skip
    write_model = lambda path: ema.save(path, {"step": str(step)})  # noqa: E731
    save_checkpoint(run, step, write_model, tensors, metadata, cfg.keep)


def captioned(dataset: Dataset, what: str) -> None:
    if len(dataset) == 0 or "caption" not in dataset[0]:
        raise TrainingError(f"{what} needs captioned data; this data set has no captions")


@torch.no_grad()
def probe(prior: Prior, clip, batch: dict) -> dict:
    """Mean cosine of the drawn image embeddings to the captions' own images' embeddings,
    and to the captions' text embeddings."""
    prior.eval()
    cond = text_cond(clip, batch["caption"])
    uncond = text_cond(clip, [""] * len(batch["caption"]))
    drawn = prior.sample(cond, uncond, seed=0)
    truth = clip.encode_image(batch["image"].to(prior.device))
    return {
        "probe_cos": float((drawn * truth).sum(-1).mean()),
        "probe_text_cos": float((drawn * cond["text_embed"]).sum(-1).mean()),
    }


def plot_prior(run: Run) -> None:
    records = run.read_log()
    plot_log(run.dir / "loss.png", records, {"x0 MSE": "loss"}, "loss", log=True)
    probes = {"cos(drawn, image's)": "probe_cos", "cos(drawn, caption's)": "probe_text_cos"}
    plot_log(run.dir / "probe.png", records, probes, "cosine")


def train_prior(
    cfg: PriorTrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or continue) the prior run in cfg.out; returns the folder."""
    if not cfg.clip and not resume:
        raise TrainingError("--model prior needs --clip FOLDER (the CLIP it learns the map of)")
    given = dataset
    run, cfg, device, dataset = start_run(cfg, resume, stored_prior_config, ARCHITECTURE, dataset)
    if not 0 <= cfg.cond_drop < 1:
        raise TrainingError(f"--cond-drop must be in [0, 1), got {cfg.cond_drop}")
    if given is None and cfg.data_options:  # start_run's data set has the default options
        dataset = load_dataset(cfg.data, cfg.size, **cfg.data_options)
    captioned(dataset, "--model prior")
    clip = frozen_clip(cfg.clip, device)
    config = PriorConfig(
        embed_dim=clip.embed_dim, text_width=clip.config.text_width,
        context_length=clip.config.context_length, width=cfg.width, layers=cfg.layers,
        heads=cfg.heads, clip=clip.spec,
    )  # fmt: skip
    if cfg.width % cfg.heads:
        raise TrainingError(f"--width {cfg.width} does not split into {cfg.heads} heads")
    torch.manual_seed(cfg.seed)
    prior = Prior(config).to(device)
    ema = copy.deepcopy(prior).requires_grad_(False)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.lr, weight_decay=0.0)
    generators = training_generators(cfg.seed, 0, torch.device("cpu"))
    batches = training_batches(
        dataset, cfg.batch_size, cfg.seed, generators["data"], device, workers=cfg.workers
    )
    held_out = collate([dataset[len(dataset) - 1 - i] for i in range(min(PROBE, len(dataset)))])
    stop = Stop(cfg.minutes)
    with stop.catching_signals(), run_folder_errors(run), contextlib.closing(batches):
        step = 0
        if resume:
            check_clip(clip, Prior.load(run.model_path).config.clip, "prior run")
            tensors, metadata = read_safetensors(run.state_path)
            prior.net.load_state_dict(module_state(tensors, "prior"))
            restore_training_state(tensors, metadata, {"prior": opt}, generators)
            restore_stream(batches, metadata)
            step = int(metadata["step"])
            ema.net.load_state_dict(read_safetensors(run.model_path)[0])
            run.truncate_log(step)
        write_run_config(run, cfg)
        if progress:
            params = sum(p.numel() for p in prior.parameters())
            print(
                f"training an unCLIP prior ({params / 1e6:.2f}M parameters, {config.layers} "
                f"layers of {config.width}) over {config.embed_dim}-value CLIP embeddings on "
                f"{cfg.data} ({len(dataset)} images) on {device}, steps {step}->{cfg.steps}",
                flush=True,
            )
        loop = TrainLoop(run, step, cfg.steps, stop, cfg.log_every, progress, on_step)
        prior.train()
        while loop.running():
            lr = cfg.lr * min(1.0, (loop.step + 1) / max(1, cfg.warmup))
            for group in opt.param_groups:
                group["lr"] = lr
            batch = batches.next()
            with torch.no_grad():
                embeds = clip.encode_image(batch["image"].to(device))
                n = len(embeds)
                dropped = torch.rand(n, generator=generators["cond"]) < cfg.cond_drop
                captions = [
                    "" if d else c for c, d in zip(batch["caption"], dropped.tolist(), strict=True)
                ]
                cond = text_cond(clip, captions)
            loss = prior.loss(embeds, cond, generators["noise"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            opt.step()
            update_ema(ema, prior, loop.step, cfg.ema_decay)
            loop.advance({"loss": loss.detach()}, lr)
            loop.verify_before(cfg.checkpoint_every, cfg.sample_every)
            if loop.due(cfg.checkpoint_every):
                save_prior_state(run, loop.step, cfg, prior, ema, opt, generators, batches)
                loop.saved_step = loop.step
            if loop.due(cfg.sample_every):
                run.append_log({"step": loop.step, **probe(ema, clip, held_out)})
                plot_prior(run)
        loop.close()
        step = loop.step
        if step != loop.saved_step or not run.exists():
            save_prior_state(run, step, cfg, prior, ema, opt, generators, batches)
        run.append_log({"step": step, **probe(ema, clip, held_out)})
        plot_prior(run)
        if progress:
            print(f"stopped at step {step} after {loop.elapsed() / 60:.1f} min; EMA prior in "
                  f"{run.model_path}")  # fmt: skip
    stop.end_if_signalled(run, step)
    return run.dir


SHARED_OPTIONS = (
    "data", "clip", "out", "size", "steps", "minutes", "batch_size", "lr", "warmup", "cond_drop",
    "ema_decay", "device", "seed", "sample_every", "checkpoint_every", "log_every", "keep",
    "workers",
)  # fmt: skip
NOT_FOR_PRIOR = (
    "grad_accum", "prediction", "schedule", "zero_terminal_snr", "min_snr_gamma", "cond",
    "text_encoder", "text_encoder_path", "channels", "channel_mult", "attention",
    "layers_per_block", "dropout", "layout_map", "layout_steps", "precision", "latent", "init",
    "crop", "flip", "buckets", "compile",
)  # fmt: skip


def train_from_cli(options: dict, command: Callable) -> None:
    """`difusion train --model prior --clip FOLDER`."""
    from .cli.options import _key_values

    shared = options_for_model("prior", options, command, SHARED_OPTIONS, NOT_FOR_PRIOR)
    shared["clip"] = shared.get("clip") or ""
    shared["data_options"] = _key_values(options.get("data_option") or [], "--data-option")
    train_prior(PriorTrainConfig(**shared), resume=options["resume"])
