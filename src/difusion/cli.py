"""The `difusion` command."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

app = typer.Typer(
    help="Diffusion models from the noise schedule to text-to-image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# options several commands share
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Seed = Annotated[int, typer.Option(help="Seed of everything random.")]
Minutes = Annotated[float | None, typer.Option(help="Stop (and save) after this wall time.")]
# the diffusion recipe, shared by train and compare
Prediction = Annotated[str, typer.Option(help="What the U-Net predicts: eps, v or x0.")]
ZeroTerminalSNR = Annotated[bool, typer.Option(help="Rescale the schedule to zero terminal SNR.")]
MinSNRGamma = Annotated[float, typer.Option(help="Min-SNR loss weighting (0: off; 5 is usual).")]
SampleEvery = Annotated[int, typer.Option(help="Steps between sample grids and loss plots.")]
CheckpointEvery = Annotated[int, typer.Option(help="Steps between checkpoints.")]
LogEvery = Annotated[int, typer.Option(help="Steps between log lines (means since the last).")]
Workers = Annotated[
    int, typer.Option(help="Processes decoding the data beside training (0: none).")
]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")]
DataOption = Annotated[
    list[str] | None,
    typer.Option(
        help="KEY=VALUE for the data set, repeatable (e.g. two_object_prob=0.75 for shapes)."
    ),
]


class UserError(Exception):
    """Bad input: reported as one line, exit status 1."""


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None


def _check_output(path: Path, suffixes: tuple[str, ...]) -> Path:
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: the output must end in {' or '.join(suffixes)}")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


@app.command()
def noise(
    image: Annotated[Path, typer.Argument(help="Any image file (grayscale, RGB, RGBA; any size).")],
    schedule: Annotated[str, typer.Option(help="linear, cosine or scaled_linear.")] = "cosine",
    steps: Annotated[
        str, typer.Option(help="Timesteps to show, comma-separated.")
    ] = "0,100,250,500,750,999",
    size: Annotated[int, typer.Option(help="Resize and centre-crop to this size.")] = 64,
    zero_terminal_snr: Annotated[bool, typer.Option(help="Rescale to zero terminal SNR.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write.")] = Path(
        "noise.png"
    ),
) -> None:
    """Show the forward process: an image dissolving into Gaussian noise."""
    from .images import labelled_strip, load_image, to_pil
    from .schedule import NoiseSchedule

    if size < 8 or size > 1024:
        raise UserError(f"--size must be between 8 and 1024, got {size}")
    _check_output(output, (".png",))
    sched = NoiseSchedule(kind=schedule, zero_terminal_snr=zero_terminal_snr)
    ts = _ints(steps, "--steps")
    if not ts or min(ts) < 0 or max(ts) >= sched.num_steps:
        raise UserError(f"--steps must lie in 0..{sched.num_steps - 1}, got {steps!r}")
    x0 = load_image(image, size)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor(ts)
    xt = sched.q_sample(x0.expand(len(ts), -1, -1, -1), t, eps.expand(len(ts), -1, -1, -1))
    snr = sched.snr(t)
    labels = [f"t={int(ti)}\nSNR={float(s):.3g}" for ti, s in zip(t, snr, strict=True)]
    scale = max(1, 96 // size)
    pics = [p.resize((size * scale, size * scale), 0) for p in to_pil(xt)]
    labelled_strip(pics, labels).save(output)
    typer.echo(f"wrote {output} ({schedule} schedule, t = {', '.join(map(str, ts))})")


@app.command()
def train(
    data: Annotated[
        str, typer.Option(help="digits, fashion, shapes, or a folder of images.")
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
    size: Annotated[int | None, typer.Option(help="Image size (default: the data set's).")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    warmup: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 200,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the sampling weights.")] = 0.999,
    prediction: Prediction = "eps",
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
    attention: Annotated[str, typer.Option(help="Resolutions with self-attention.")] = "16,8",
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
            help="unet (a diffusion model), gan (the DCGAN baseline) or vae (a KL autoencoder)."
        ),
    ] = "unet",
    latent: Annotated[
        str | None,
        typer.Option(help="A VAE run folder or file: train the U-Net in its latent space."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help='Fine-tune: start from this model ("default", a run folder or a .safetensors '
            "file), keeping its architecture, condition and objective."
        ),
    ] = None,
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
    from .runs import given_options
    from .train import TrainConfig
    from .train import train as run_training

    if steps < 1 or batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    if model not in ("unet", "gan", "vae"):
        raise UserError(f"--model must be unet, gan or vae, got {model!r}")
    if model == "vae":  # shares --channels, --channel-mult, --layers-per-block, ...
        from .vae_train import train_vae, vae_config_from_cli

        train_vae(vae_config_from_cli(dict(locals()), train), resume=resume)
        return
    if model == "gan":  # the options it shares with a diffusion run; the others must stay unset
        from .gan_train import gan_config_from_cli, train_gan

        train_gan(gan_config_from_cli(dict(locals()), train), resume=resume)
        return
    if cond not in (None, "label", "text"):
        raise UserError(f"--cond must be 'label' or 'text', got {cond!r}")
    if crop not in ("center", "random"):
        raise UserError(f"--crop must be center or random, got {crop!r}")
    if text_encoder not in ("minilm", "clip", "scratch"):
        raise UserError(f"--text-encoder must be minilm, clip or scratch, got {text_encoder!r}")
    if not 0 <= cond_drop < 1:
        raise UserError("--cond-drop must be in [0, 1)")
    if prediction not in ("eps", "v", "x0"):
        raise UserError(f"--prediction must be eps, v or x0, got {prediction!r}")
    given = given_options(dict(locals()), train, FIXED_BY_INIT) if init is not None else []
    if given:
        raise UserError(f"{', '.join(given)}: --init keeps the model's own; leave them out")
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
        workers=workers,
        crop=crop,
        flip=flip,
        buckets=buckets,
        compile=compile,
    )
    run_training(cfg, resume=resume)


# the training options that set a model's architecture, condition and objective
FIXED_BY_INIT = (
    "size", "prediction", "schedule", "zero_terminal_snr", "cond", "text_encoder",
    "channels", "channel_mult", "attention", "layers_per_block", "dropout", "latent",
)  # fmt: skip


def _key_values(items: list[str], what: str) -> dict[str, Any]:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} (values read as JSON where they parse)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what} must be KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder or a model .safetensors file.")],
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 16,
    sampler: Annotated[
        str | None,
        typer.Option(
            help="ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, lcm (default: the model's)."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps (default: 1000 for ddpm, else the model's).")
    ] = None,
    spacing: Annotated[
        str | None,
        typer.Option(help="trailing, leading, linspace or karras (default: the model's)."),
    ] = None,
    eta: Annotated[float | None, typer.Option(help="DDIM eta (0 deterministic, 1 = DDPM).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    label: Annotated[
        int | None, typer.Option(help="Class to draw (default: every class in turn).")
    ] = None,
    guidance: Annotated[
        float, typer.Option(help="Classifier-free guidance scale (1 = off).")
    ] = 1.0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Grid PNG to write.")] = Path(
        "samples.png"
    ),
    gif: Annotated[Path | None, typer.Option(help="Also write the trajectory as a GIF.")] = None,
    device: Device = "auto",
) -> None:
    """Draw images from a trained model, optionally as an animation from noise."""
    from .compare import load_generator_or_diffusion
    from .images import auto_scale, grid, save_gif, to_pil, trajectory_frame
    from .nn.gan import GAN
    from .runs import pick_device

    if n < 1 or n > 1024:
        raise UserError(f"-n must be between 1 and 1024, got {n}")
    _check_output(output, (".png", ".jpg", ".jpeg", ".webp"))
    if gif is not None:
        _check_output(gif, (".gif",))
    steps = steps or (1000 if sampler == "ddpm" else None)
    model = load_generator_or_diffusion(checkpoint, pick_device(device))
    if isinstance(model, GAN):  # one pass of the generator: no sampler, condition or trajectory
        if label is not None or guidance != 1.0 or gif is not None:
            raise UserError("--label, --guidance and --gif need a diffusion model; this is a GAN")
        grid(to_pil(model.sample(n, seed=seed)), scale=auto_scale(model.config.image_size)).save(
            output
        )
        typer.echo(f"wrote {output} (GAN, one pass)")
        return
    cond = uncond = None
    if label is not None:
        cond, uncond = model.label_cond([label] * n)
    elif model.config.cond == "label":  # no label asked for: every class in turn
        cond, uncond = model.label_cond([i % model.config.null_label for i in range(n)])
    elif guidance != 1.0:
        raise UserError("--guidance needs a condition (--label for a class-conditional model)")
    vae = None
    if model.config.latent is not None:  # a latent model: its VAE decodes the samples
        from .vae_train import vae_for

        vae = vae_for(model.config.latent, model.device)
    frames = []
    scale = auto_scale(model.config.image_size * (vae.config.downscale if vae else 1))

    def record(info: dict) -> None:
        frames.append(trajectory_frame(info, scale, decode=vae.decode_latents if vae else None))

    x = model.sample(
        n,
        sampler=sampler,
        steps=steps,
        spacing=spacing,
        seed=seed,
        cond=cond,
        uncond=uncond,
        guidance=guidance,
        callback=record if gif is not None else None,
        eta=eta,
    )
    if vae is not None:
        with torch.no_grad():
            x = vae.decode_latents(x).clamp(-1, 1)
    final = grid(to_pil(x), scale=scale)
    final.save(output)
    if gif is not None:
        stride = max(1, len(frames) // 100)  # a 1000-step DDPM run keeps ~100 frames
        save_gif(frames[::stride] + [final], gif)
    sampler, steps = sampler or model.config.sampler, steps or model.config.steps
    typer.echo(f"wrote {output}" + (f" and {gif}" if gif else "") + f" ({sampler}, {steps} steps)")


WeightsDtype = Annotated[
    str,
    typer.Option(
        help="The U-Net's weights: fp32, or bf16 (faster only on CPUs with AVX-512 bf16 or AMX, "
        "and on GPUs; the sampler stays fp32)."
    ),
]


def _weights_dtype(name: str) -> torch.dtype:
    from .pipeline import dtype_named

    try:
        return dtype_named(name)
    except ValueError:
        raise UserError(f"--dtype must be fp32 or bf16, got {name!r}") from None


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts (one grid row each).")],
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps (default: the model's).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance (default: the model's).")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            help="ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, lcm (default: the model's)."
        ),
    ] = None,
    negative: Annotated[
        str, typer.Option(help="Negative prompt (replaces the unconditional branch).")
    ] = "",
    model: Annotated[
        str, typer.Option(help="'default' (shipped), a run folder or a model file.")
    ] = "default",
    output: Annotated[Path, typer.Option("-o", "--output", help="Grid PNG to write.")] = Path(
        "generated.png"
    ),
    gif: Annotated[Path | None, typer.Option(help="Also write the denoising as a GIF.")] = None,
    height: Annotated[
        int | None, typer.Option(help="Image height (latent models: a multiple of 8).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Image width (latent models: a multiple of 8).")
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Start image: img2img, or inpainting with --mask.")
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="Inpainting mask for --image (white = redraw).")
    ] = None,
    strength: Annotated[
        float | None, typer.Option(help="img2img: how much of --image to redraw (0-1).")
    ] = None,
    device: Device = "auto",
    dtype: WeightsDtype = "fp32",
    compile: Annotated[
        bool,
        typer.Option(
            help="torch.compile the U-Net first (pays for many images, not for one grid)."
        ),
    ] = False,
) -> None:
    """Generate images from text prompts (our models, or Stable Diffusion files and folders)."""
    import time

    from .denoiser import check_guidance
    from .images import auto_scale, grid, save_gif, to_pil
    from .pipeline import Pipeline
    from .runs import pick_device

    weights_dtype = _weights_dtype(dtype)
    if not 1 <= n <= 256:
        raise UserError(f"-n must be between 1 and 256, got {n}")
    if any(not p.strip() for p in prompts):
        raise UserError("a prompt is empty")
    _check_output(output, (".png", ".jpg", ".jpeg", ".webp"))
    if gif is not None:
        _check_output(gif, (".gif",))
    if mask is not None and image is None:
        raise UserError("--mask needs --image")
    if strength is not None and not 0 < strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    if guidance is not None:
        check_guidance(guidance)
    from PIL import Image, UnidentifiedImageError

    def open_image(path: Path | None) -> Image.Image | None:
        if path is None:
            return None
        try:
            return Image.open(path).convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None

    init, mask_image = open_image(image), open_image(mask)
    pipe = Pipeline.from_pretrained(model, pick_device(device), weights_dtype)
    if compile:
        pipe.compile()
    scale = auto_scale(height or width or pipe.image_size)
    frames = []

    def record(i: int, sigma: float, x0: torch.Tensor) -> None:
        frames.append(grid(to_pil(pipe.decode(x0)), cols=n, scale=scale))

    start = time.monotonic()
    x = pipe.sample(
        prompts,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        seed=seed,
        n=n,
        callback=record if gif is not None else None,
        height=height,
        width=width,
        image=init,
        mask_image=mask_image,
        strength=strength,
    )
    seconds = time.monotonic() - start
    final = grid(to_pil(x), cols=n, scale=scale)
    final.save(output)
    if gif is not None:
        save_gif(frames, gif, ms_per_frame=150)  # the last x0 estimate is the final image
    typer.echo(
        f"wrote {output}"
        + (f" and {gif}" if gif else "")
        + f" ({len(x)} images in {seconds:.1f} s)"
    )


@app.command(name="eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder or a model .safetensors file.")],
    data: Annotated[
        str | None, typer.Option(help="Real data to compare with (default: the run's).")
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Samples (and real images) to compare.")] = 2000,
    feature_net: Annotated[
        str | None,
        typer.Option(help="inception, a data set's shipped classifier (default), or a file."),
    ] = None,
    alignment: Annotated[
        bool, typer.Option(help="Score prompt alignment (shapes text models).")
    ] = False,
    prompts: Annotated[
        int, typer.Option(help="With --alignment: prompts of each kind per seed.")
    ] = 200,
    seeds: Annotated[str, typer.Option(help="With --alignment: seeds, comma-separated.")] = "0",
    wording: Annotated[
        str | None,
        typer.Option(
            help="With --alignment: canonical (the default), or prompt with colour, shape or "
            "relation words unseen in training."
        ),
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="Sampler (default: the model's).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps (default: the model's).")
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    device: Device = "auto",
) -> None:
    """Measure a model: FID/KID, precision/recall, mode coverage; or prompt alignment."""
    import json

    from .compare import load_generator_or_diffusion
    from .evaluate import evaluate, evaluate_alignment, format_table
    from .model import resolve_checkpoint
    from .runs import pick_device

    if n < 2:
        raise UserError(f"-n must be at least 2, got {n}")
    path = resolve_checkpoint(checkpoint)
    model = load_generator_or_diffusion(path, pick_device(device))
    if alignment:
        result = evaluate_alignment(
            model,
            prompts,
            prompts,
            _ints(seeds, "--seeds"),
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            wording=wording,
        )
    else:
        if data is None:
            config_file = path.parent / "train_config.json"
            if not config_file.is_file():
                raise UserError("give --data: the model file has no run folder to read it from")
            data = json.loads(config_file.read_text())["data"]
        result = evaluate(
            model, data, n, feature_net or data, sampler=sampler, steps=steps, seed=seed,
            guidance=1.0 if guidance is None else guidance,
        )  # fmt: skip
    typer.echo(json.dumps(result, indent=2) if json_out else format_table(result))


@app.command()
def compare(
    data: Annotated[
        list[str] | None,
        typer.Option(help="A data set; repeat for several (default: digits, fashion, shapes)."),
    ] = None,
    budget_minutes: Annotated[
        float | None, typer.Option(help="Training wall time of each model and seed (default 5).")
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="The study at several budgets, e.g. 2,5,10,20,40 (minutes of training each; "
            "runs continue from budget to budget): <out>/<data>/sweep/."
        ),
    ] = None,
    distill_minutes: Annotated[
        float,
        typer.Option(
            help="With --budgets: distil each budget's diffusion model this long (extra "
            "compute) and measure the student at 1, 2 and 4 lcm steps; 0 turns it off."
        ),
    ] = 2.0,
    seeds: Annotated[
        str,
        typer.Option(
            help='Training seeds per model: N, per data set as "fashion=3,1", or a list "0,4,7".'
        ),
    ] = "fashion=3,1",
    out: Annotated[Path, typer.Option(help="Folder of the study: runs, report.md, plots.")] = Path(
        "compare"
    ),
    preset: Annotated[
        str, typer.Option(help="Network sizes: small (the study) or tiny (smoke tests).")
    ] = "small",
    samples: Annotated[int, typer.Option(help="Samples a final model is measured on.")] = 1000,
    curve_points: Annotated[int, typer.Option(help="Checkpoints measured along training.")] = 5,
    curve_samples: Annotated[int, typer.Option(help="Samples a point along training.")] = 250,
    steps_samples: Annotated[
        int, typer.Option(help="Samples a point of the quality-vs-steps curve.")
    ] = 200,
    speed_batch: Annotated[int, typer.Option(help="Batch of the speed measurement.")] = 64,
    speed_repeats: Annotated[int, typer.Option(help="Timed runs of each sampler.")] = 3,
    inception: Annotated[
        bool,
        typer.Option(
            "--inception/--no-inception",
            help="The headline FID also in Inception-v3 features (about 0.05 s an image on 2 "
            "CPU cores).",
        ),
    ] = True,
    inception_samples: Annotated[int, typer.Option(help="Samples for the Inception FID.")] = 1000,
    feature_net: Annotated[
        str | None,
        typer.Option(help="Feature network (default: the data set's classifier)."),
    ] = None,
    prediction: Prediction = "eps",
    zero_terminal_snr: ZeroTerminalSNR = False,
    min_snr_gamma: MinSNRGamma = 0.0,
    device: Device = "auto",
) -> None:
    """Diffusion vs GAN on the same wall-clock budget: stability, quality, diversity, speed;
    with --budgets, FID against training time."""
    from .compare import CompareConfig, SweepConfig, parse_budgets, sweep
    from .compare import compare as run_study

    if budgets is not None and budget_minutes is not None:
        raise UserError("give --budgets or --budget-minutes, not both")
    cfg = CompareConfig(
        data=tuple(data or ("digits", "fashion", "shapes")), out=str(out),
        budget_minutes=5.0 if budget_minutes is None else budget_minutes, seeds=seeds,
        preset=preset, samples=samples, curve_points=curve_points, curve_samples=curve_samples,
        steps_samples=steps_samples, speed_batch=speed_batch, speed_repeats=speed_repeats,
        inception=inception, inception_samples=inception_samples, feature_net=feature_net,
        prediction=prediction, zero_terminal_snr=zero_terminal_snr, min_snr_gamma=min_snr_gamma,
        device=device,
    )  # fmt: skip
    if budgets is None:
        run_study(cfg)
    else:
        sweep(SweepConfig(cfg, parse_budgets(budgets), distill_minutes))


@app.command()
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
) -> None:
    """Distil a model into a few-step student (latent consistency distillation)."""
    from .distill import DistillConfig
    from .distill import distill as run_distillation

    cfg = DistillConfig(
        teacher=teacher, out=str(out), data=data,
        data_options=_key_values(data_option or [], "--data-option"), steps=steps,
        minutes=minutes, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        guidance_min=guidance_min, guidance_max=guidance_max, solver_steps=solver_steps,
        precision=precision, device=device, seed=seed, sample_every=sample_every,
        checkpoint_every=checkpoint_every, log_every=log_every, workers=workers,
    )  # fmt: skip
    run_distillation(cfg, resume=resume)


@app.command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="'default', a run folder, a model file or a Stable Diffusion folder / file; "
            "repeat to serve several (the first is the default)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DIFUSION_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every API call (the page: /?key=KEY).",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Generations at a time, per model.")] = 1,
    queue_size: Annotated[
        int, typer.Option(help="Requests waiting per model; past that, 429 with Retry-After.")
    ] = 8,
    timeout: Annotated[
        float, typer.Option(help="Seconds a generation may run before it is cancelled.")
    ] = 300.0,
    device: Device = "auto",
    dtype: WeightsDtype = "fp32",
) -> None:
    """Serve models over HTTP: OpenAI's images API, AUTOMATIC1111's, and a page at /."""
    import logging

    import uvicorn

    from .runs import pick_device
    from .serve import ServeSettings, create_app

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    if concurrency < 1 or queue_size < 0 or not timeout > 0:
        raise UserError("--concurrency and --timeout must be positive, --queue-size at least 0")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    _weights_dtype(dtype)
    _check_can_listen(host, port)  # before the minutes a large model may take to load
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.warning("listening on %s without --api-key: anyone who reaches it can use it", host)
    settings = ServeSettings(
        models=tuple(model or ["default"]), api_key=api_key, concurrency=concurrency,
        queue_size=queue_size, timeout=timeout, device=str(pick_device(device)), dtype=dtype,
    )  # fmt: skip
    application = create_app(settings)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    typer.echo(f"serving {', '.join(settings.models)}: open http://{shown}:{port}/", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False)


def _check_can_listen(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main() -> None:
    from .checkpoints import CheckpointError
    from .runs import TrainingError

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        app()  # standalone: typer reports usage errors itself (exit 2)
    except (UserError, ValueError, CheckpointError, TrainingError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
