"""`difusion train` and `distill`."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    CheckpointEvery,
    DataOption,
    Device,
    LogEvery,
    MinSNRGamma,
    Minutes,
    Prediction,
    Resume,
    SampleEvery,
    Seed,
    UserError,
    Workers,
    ZeroTerminalSNR,
    _ints,
    _key_values,
    check_output_folder,
    check_resume,
)


def train(
    data: Annotated[
        str,
        typer.Option(
            help="A data set: digits, fashion, mnist, emoji or shapes; a folder of images "
            "(class subfolders or same-name .txt captions); a folder with metadata.jsonl; a "
            "datasets folder (save_to_disk); .parquet files; or WebDataset shards "
            "('shards/{000000..000099}.tar')."
        ),
    ] = "digits",
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, log, pictures).")] = Path(
        "runs/run"
    ),
    steps: Annotated[int, typer.Option(help="Total optimisation steps.")] = 5000,
    minutes: Minutes = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per batch (per process and accumulated batch).")
    ] = 64,
    grad_accum: Annotated[
        int, typer.Option(help="Batches whose gradients make one step (a larger global batch).")
    ] = 1,
    size: Annotated[
        int | None,
        typer.Option(help="Image size (default: the data set's; a Stable Diffusion --init's own)."),
    ] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    warmup: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 200,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the sampling weights.")] = 0.999,
    prediction: Prediction = "eps",
    objective: Annotated[
        str,
        typer.Option(
            help="ddpm (--prediction on --schedule), edm (Karras et al.'s preconditioning) or "
            "flow (flow matching, SD3's logit-normal times)."
        ),
    ] = "ddpm",
    backbone: Annotated[
        str, typer.Option(help="unet, or dit (a diffusion transformer: --channels wide).")
    ] = "unet",
    patch_size: Annotated[int, typer.Option(help="dit: pixels a side of a patch.")] = 2,
    depth: Annotated[int, typer.Option(help="dit: transformer blocks.")] = 6,
    head_dim: Annotated[int, typer.Option(help="Channels of an attention head.")] = 32,
    schedule: Annotated[str, typer.Option(help="linear, cosine or scaled_linear.")] = "cosine",
    zero_terminal_snr: ZeroTerminalSNR = False,
    min_snr_gamma: MinSNRGamma = 0.0,
    cond: Annotated[
        str | None, typer.Option(help="'label' (class-conditional) or 'text' (captioned data).")
    ] = None,
    text_encoder: Annotated[
        str, typer.Option(help="For --cond text: minilm (pretrained, frozen), clip, or scratch.")
    ] = "minilm",
    text_encoder_path: Annotated[
        str | None, typer.Option(help="Folder of a CLIP text encoder (for --text-encoder clip).")
    ] = None,
    cond_drop: Annotated[float, typer.Option(help="Probability of dropping the condition.")] = 0.1,
    channels: Annotated[int, typer.Option(help="Base channel count of the U-Net.")] = 64,
    channel_mult: Annotated[str, typer.Option(help="Channel multiplier per level.")] = "1,2,2",
    attention: Annotated[
        str,
        typer.Option(
            help="Resolutions with self-attention, each one of the U-Net's levels (the "
            "default: those of 16 and 8 it has)."
        ),
    ] = "16,8",
    layers_per_block: Annotated[int, typer.Option(help="ResBlocks per level.")] = 2,
    dropout: Annotated[float, typer.Option(help="Dropout in the ResBlocks.")] = 0.0,
    layout_map: Annotated[
        bool,
        typer.Option(
            help="Give a text model a map of where the prompt puts things: each place attends "
            "to the prompt, fitted alone to the images first (with --init: added, read "
            "through zero projections)."
        ),
    ] = False,
    layout_steps: Annotated[
        int, typer.Option(help="Steps fitting a new layout map before the denoiser's.")
    ] = 2000,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 (CPU or CUDA) or fp16 (CUDA).")
    ] = "fp32",
    device: Device = "auto",
    seed: Seed = 0,
    sample_every: SampleEvery = 500,
    checkpoint_every: CheckpointEvery = 250,
    log_every: LogEvery = 25,
    keep: Annotated[
        int, typer.Option(help="Also keep the last K checkpoints, in checkpoints/step_N/.")
    ] = 0,
    resume: Resume = False,
    model: Annotated[
        str,
        typer.Option(
            help="unet (a diffusion model), gan (the DCGAN baseline), vae (a KL autoencoder), "
            "clip (a contrastive text and image encoder), prior or decoder (unCLIP's, over a "
            "CLIP: --clip)."
        ),
    ] = "unet",
    clip: Annotated[
        str | None, typer.Option(help="For --model prior and decoder: the CLIP folder.")
    ] = None,
    latent: Annotated[
        str | None,
        typer.Option(help="A VAE run folder or file: train the U-Net in its latent space."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help='Fine-tune: start from this model ("default", a run folder or a .safetensors '
            "file, a latent one too), keeping its architecture, condition and objective; or "
            "train a --lora on a Stable Diffusion checkpoint (a diffusers folder or one file)."
        ),
    ] = None,
    warm_start: Annotated[
        str | None,
        typer.Option(
            help="Start a new model from this one's U-Net (its architecture and objective; "
            "every weight whose name and shape fit): e.g. another text encoder or condition "
            "over a trained trunk."
        ),
    ] = None,
    lora: Annotated[
        int,
        typer.Option(
            help="With --init: train a LoRA adapter of this rank on the frozen model (0: the "
            "whole model); the run folder gets pytorch_lora_weights.safetensors."
        ),
    ] = 0,
    lora_alpha: Annotated[
        float | None, typer.Option(help="The adapter's alpha (default: its rank).")
    ] = None,
    lora_targets: Annotated[
        str, typer.Option(help="The layers adapted: attn, attn+ff or all (every conv, linear).")
    ] = "attn",
    data_option: DataOption = None,
    workers: Workers = 0,
    crop: Annotated[
        str, typer.Option(help="center or random: where the square is cut from each picture.")
    ] = "center",
    flip: Annotated[bool, typer.Option(help="Flip pictures left-right at random.")] = False,
    buckets: Annotated[
        bool,
        typer.Option(help="Keep each picture's aspect ratio: batches of one size bucket each."),
    ] = False,
    compile: Annotated[
        bool, typer.Option(help="torch.compile the U-Net (its compile time is reported).")
    ] = False,
) -> None:
    """Train a diffusion model (on one process, or several under torchrun), a DCGAN or a VAE."""
    from ..runs import RESUME_SETTINGS, given_options, pick_device
    from ..sd import is_sd_checkpoint
    from ..sizes import check_training_size
    from ..train import TrainConfig
    from ..train import train as run_training

    if steps < 1 or batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    check_output_folder(out)
    if size is not None:
        if model == "unet":
            levels = tuple(channels * m for m in _ints(channel_mult, "--channel-mult"))
            check_training_size(size, batch_size, levels, layers_per_block, pick_device(device))
        else:  # another model: its batch of images, at least
            check_training_size(size, batch_size, (3,), 0, pick_device(device))
    kept = check_resume(out, dict(locals()), RESUME_SETTINGS) if resume else {}
    if model != "unet":
        if model not in TRAINERS:
            raise UserError(f"--model must be unet, {', '.join(TRAINERS)}, got {model!r}")
        options = {**locals(), **kept}
        importlib.import_module(TRAINERS[model], __package__).train_from_cli(options, train)
        return
    if clip is not None:
        raise UserError("--clip is for --model prior and decoder")
    if cond not in (None, "label", "text"):
        raise UserError(f"--cond must be 'label' or 'text', got {cond!r}")
    if crop not in ("center", "random"):
        raise UserError(f"--crop must be center or random, got {crop!r}")
    if text_encoder not in ("minilm", "clip", "scratch"):
        raise UserError(f"--text-encoder must be minilm, clip or scratch, got {text_encoder!r}")
    if text_encoder_path is not None and text_encoder != "clip":
        raise UserError("--text-encoder-path is the folder of --text-encoder clip")
    if not 0 <= cond_drop < 1:
        raise UserError("--cond-drop must be in [0, 1)")
    if lora_targets not in ("attn", "attn+ff", "all"):
        raise UserError(f"--lora-targets must be attn, attn+ff or all, got {lora_targets!r}")
    if not lora and (lora_alpha is not None or lora_targets != "attn"):
        raise UserError("--lora-alpha and --lora-targets shape an adapter: give --lora RANK too")
    if prediction not in ("eps", "v", "x0"):
        raise UserError(f"--prediction must be eps, v or x0, got {prediction!r}")
    if objective not in ("ddpm", "edm", "flow"):
        raise UserError(f"--objective must be ddpm, edm or flow, got {objective!r}")
    if backbone not in ("unet", "dit"):
        raise UserError(f"--backbone must be unet or dit, got {backbone!r}")
    fixed = FIXED_BY_INIT[1:] if init is not None and is_sd_checkpoint(init) else FIXED_BY_INIT
    given = given_options(dict(locals()), train, fixed) if init is not None else []
    if given:
        raise UserError(f"{', '.join(given)}: --init keeps the model's own; leave them out")
    given = given_options(dict(locals()), train, FIXED_BY_WARM_START) if warm_start else []
    if given:
        raise UserError(f"{', '.join(given)}: --warm-start keeps the model's own; leave them out")
    cfg = TrainConfig(
        data=data,
        out=str(out),
        size=size,
        steps=steps,
        minutes=minutes,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        ema_decay=ema_decay,
        prediction=prediction,
        objective=objective,
        backbone=backbone,
        patch_size=patch_size,
        depth=depth,
        head_dim=head_dim,
        schedule=schedule,
        zero_terminal_snr=zero_terminal_snr,
        min_snr_gamma=min_snr_gamma,
        cond=cond,
        cond_drop=cond_drop,
        text_encoder=text_encoder,
        text_encoder_path=text_encoder_path,
        channels=channels,
        channel_mult=_ints(channel_mult, "--channel-mult"),
        attention_resolutions=_ints(attention, "--attention"),
        layers_per_block=layers_per_block,
        dropout=dropout,
        layout_map=layout_map,
        layout_steps=layout_steps,
        precision=precision,
        device=device,
        seed=seed,
        sample_every=sample_every,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        keep=keep,
        latent=latent,
        data_options=_key_values(data_option or [], "--data-option"),
        init=init,
        warm_start=warm_start,
        workers=workers,
        crop=crop,
        flip=flip,
        buckets=buckets,
        compile=compile,
        lora=lora,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
    )
    run_training(replace(cfg, **kept), resume=resume)


# `--model` -> the module that trains it: `train_from_cli(options, command)` reads the command's
# options (each trainer says which apply to it) and trains; "unet" is train.py's diffusion model
TRAINERS = {
    "gan": "..gan_train", "vae": "..vae_train", "clip": "..clip_train",
    "prior": "..prior_train", "decoder": "..decoder_train",
}  # fmt: skip

# the training options that set a model's architecture and objective, and with them its
# condition (a Stable Diffusion --init takes all but the first: any size its U-Net and VAE take)
FIXED_BY_WARM_START = (
    "size", "prediction", "objective", "backbone", "patch_size", "depth", "head_dim", "schedule",
    "zero_terminal_snr", "channels", "channel_mult", "attention", "layers_per_block", "dropout",
)  # fmt: skip
FIXED_BY_INIT = (*FIXED_BY_WARM_START, "cond", "text_encoder", "latent")


def distill(
    teacher: Annotated[
        str, typer.Argument(help='The model to distil: "default", a run folder or a model file.')
    ],
    out: Annotated[Path, typer.Option(help="Run folder of the student.")] = Path("runs/distill"),
    data: Annotated[
        str | None, typer.Option(help="Training data (default: the teacher run's; shapes).")
    ] = None,
    data_option: DataOption = None,
    steps: Annotated[int, typer.Option(help="Total optimisation steps.")] = 5000,
    minutes: Minutes = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-5,
    warmup: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 100,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the target network.")] = 0.95,
    guidance_min: Annotated[float, typer.Option(help="Smallest guidance scale learnt.")] = 1.0,
    guidance_max: Annotated[float, typer.Option(help="Largest guidance scale learnt.")] = 4.0,
    solver_steps: Annotated[
        int, typer.Option(help="Teacher ODE steps across the schedule (one a distillation pair).")
    ] = 50,
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    device: Device = "auto",
    seed: Seed = 0,
    sample_every: SampleEvery = 500,
    checkpoint_every: CheckpointEvery = 250,
    log_every: LogEvery = 25,
    workers: Workers = 0,
    resume: Resume = False,
    lora: Annotated[
        int,
        typer.Option(
            help="Distil into a LoRA adapter of this rank on the frozen teacher (an LCM-LoRA: "
            "applied to the teacher, 4 lcm steps at guidance 1); 0: a whole student."
        ),
    ] = 0,
) -> None:
    """Distil a model into a few-step student (latent consistency distillation)."""
    from ..distill import DistillConfig
    from ..distill import distill as run_distillation
    from ..runs import RESUME_SETTINGS

    check_output_folder(out)
    kept = check_resume(out, dict(locals()), RESUME_SETTINGS) if resume else {}
    cfg = DistillConfig(
        teacher=teacher, out=str(out), data=data,
        data_options=_key_values(data_option or [], "--data-option"), steps=steps,
        minutes=minutes, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        guidance_min=guidance_min, guidance_max=guidance_max, solver_steps=solver_steps,
        precision=precision, device=device, seed=seed, sample_every=sample_every,
        checkpoint_every=checkpoint_every, log_every=log_every, workers=workers, lora=lora,
    )  # fmt: skip
    run_distillation(replace(cfg, **kept), resume=resume)
