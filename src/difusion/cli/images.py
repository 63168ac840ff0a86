"""`difusion noise`, `sample` and `generate`: pictures of the forward process and of a model's samples."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer

from .options import (
    Device,
    LoraFiles,
    UserError,
    WeightsDtype,
    _ints,
    _weights_dtype,
    check_output_file,
    check_sampling,
)


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
    from ..images import labelled_strip, load_image, to_pil
    from ..schedule import NoiseSchedule

    if size < 8 or size > 1024:
        raise UserError(f"--size must be between 8 and 1024, got {size}")
    check_output_file(output, (".png",))
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
        int | None,
        typer.Option(help="Sampling steps, 1 to 1000 (default: 1000 for ddpm, else the model's)."),
    ] = None,
    spacing: Annotated[
        str | None,
        typer.Option(help="trailing, leading, linspace or karras (default: the model's)."),
    ] = None,
    eta: Annotated[
        float | None, typer.Option(help="DDIM eta, 0 to 1 (0 deterministic, 1 = DDPM).")
    ] = None,
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
    lora: LoraFiles = None,
) -> None:
    """Draw images from a trained model, optionally as an animation from noise."""
    from ..compare import load_generator_or_diffusion
    from ..images import auto_scale, grid, save_gif, to_pil, trajectory_frame
    from ..nn.gan import GAN
    from ..runs import pick_device

    if n < 1 or n > 1024:
        raise UserError(f"-n must be between 1 and 1024, got {n}")
    check_sampling(steps, eta)
    check_output_file(output, (".png", ".jpg", ".jpeg", ".webp"))
    if gif is not None:
        check_output_file(gif, (".gif",))
    steps = steps or (1000 if sampler == "ddpm" else None)
    model = load_generator_or_diffusion(checkpoint, pick_device(device))
    if isinstance(model, GAN):  # one pass of the generator: no sampler, condition or trajectory
        if label is not None or guidance != 1.0 or gif is not None or lora:
            raise UserError(
                "--label, --guidance, --gif and --lora need a diffusion model; this is a GAN"
            )
        grid(to_pil(model.sample(n, seed=seed)), scale=auto_scale(model.config.image_size)).save(
            output
        )
        typer.echo(f"wrote {output} (GAN, one pass)")
        return
    if lora:
        from ..lora import apply_loras, parse_spec

        apply_loras(model, [parse_spec(spec) for spec in lora])
    cond = uncond = None
    if label is not None:
        cond, uncond = model.label_cond([label] * n)
    elif model.config.cond == "label":  # no label asked for: every class in turn
        cond, uncond = model.label_cond([i % model.config.null_label for i in range(n)])
    elif guidance != 1.0:
        raise UserError("--guidance needs a condition (--label for a class-conditional model)")
    vae = None
    if model.config.latent is not None:  # a latent model: its VAE decodes the samples
        from ..vae_train import vae_for

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


def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts (one grid row each).")],
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps, 1 to 1000 (default: the model's).")
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
        int | None, typer.Option(help="Image height (default: the model's; see docs/cli.md).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Image width (default: the model's; see docs/cli.md).")
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            help="Start image: img2img, or inpainting with --mask (resized to the model's "
            "size when it makes no image of this one's)."
        ),
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="Inpainting mask for --image (white = redraw).")
    ] = None,
    strength: Annotated[
        float | None, typer.Option(help="img2img: how much of --image to redraw (0-1).")
    ] = None,
    device: Device = "auto",
    dtype: WeightsDtype = "fp32",
    lora: LoraFiles = None,
    compile: Annotated[
        bool,
        typer.Option(
            help="torch.compile the U-Net first (pays for many images, not for one grid)."
        ),
    ] = False,
) -> None:
    """Generate images from text prompts (our models, or Stable Diffusion files and folders)."""
    import time

    from ..denoiser import check_guidance
    from ..images import auto_scale, grid, save_gif, to_pil
    from ..pipeline import Pipeline
    from ..runs import pick_device

    weights_dtype = _weights_dtype(dtype)
    if not 1 <= n <= 256:
        raise UserError(f"-n must be between 1 and 256, got {n}")
    if any(not p.strip() for p in prompts):
        raise UserError("a prompt is empty")
    check_output_file(output, (".png", ".jpg", ".jpeg", ".webp"))
    if gif is not None:
        check_output_file(gif, (".gif",))
    if mask is not None and image is None:
        raise UserError("--mask needs --image")
    if strength is not None and not 0 < strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    if guidance is not None:
        check_guidance(guidance)
    check_sampling(steps)
    from PIL import Image, UnidentifiedImageError

    def open_image(path: Path | None) -> Image.Image | None:
        if path is None:
            return None
        try:
            return Image.open(path).convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None

    init, mask_image = open_image(image), open_image(mask)
    pipe = Pipeline.from_pretrained(model, pick_device(device), weights_dtype, lora=lora or ())
    height, width = image_size(pipe, height, width, init, n * len(prompts))
    warn_unfamiliar(pipe, model, prompts)
    if compile:
        pipe.compile()
    scale = auto_scale(max(height, width))
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


def image_size(pipe, height: int | None, width: int | None, init, n: int) -> tuple[int, int]:
    """`generate`'s size: --height/--width as `Pipeline.check_size` allows them; with --image
    alone, the image's own size when the model makes it, else the model's (said in a line)."""
    if init is not None and height is None and width is None:
        try:
            return pipe.check_size(init.height, init.width, n)
        except ValueError:
            native = pipe.image_size
            warnings.warn(
                f"--image is {init.width}x{init.height}, a size {pipe.size_rule()}: "
                f"it is resized to {native}x{native}",
                stacklevel=2,
            )
    return pipe.check_size(height, width, n)


def warn_unfamiliar(pipe, model: str, prompts: list[str]) -> None:
    """A warning for each prompt far from every caption the model was trained on, where its
    training data can be drawn again (`difusion.familiar`)."""
    from ..familiar import training_captions, training_config, unfamiliar_prompts
    from ..model import SHIPPED, resolve_checkpoint
    from ..sd import is_sd_checkpoint

    if pipe.kind != "text" or (model not in SHIPPED and is_sd_checkpoint(model)):
        return
    if pipe.model.text_encoder is None:  # unCLIP: the prompt goes to its CLIP and prior
        return
    captions = training_captions(training_config(resolve_checkpoint(model)))
    for prompt, near in unfamiliar_prompts(pipe.model.text_encoder, prompts, captions or []):
        warnings.warn(
            f"{prompt[:60]!r} is far from every caption this model was trained on (similarity "
            f"{near:.2f}): expect pictures that ignore it",
            stacklevel=2,
        )
