"""`difusion unclip` (a prior and a decoder as one unCLIP model) and `difusion variations`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import Device, UserError, check_output_file


def unclip(
    prior: Annotated[str, typer.Option(help="The prior's run folder (train --model prior).")],
    decoder: Annotated[str, typer.Option(help="The decoder's run folder (train --model decoder).")],
    out: Annotated[Path, typer.Option(help="The unCLIP model folder to write.")],
    clip: Annotated[
        str | None, typer.Option(help="The CLIP folder (default: the decoder's).")
    ] = None,
) -> None:
    """Put a prior, a decoder and their CLIP into one unCLIP model (DALL-E 2) that generate,
    variations, serve and Pipeline.from_pretrained load."""
    from ..unclip import pack

    folder = pack(prior, decoder, out, clip)
    typer.echo(f"wrote {folder} (prior, decoder and CLIP)")


def unclip_pipeline(model: str, device: str):
    """The unCLIP model `model`, or one line saying it is not one."""
    from ..pipeline import Pipeline
    from ..runs import pick_device
    from ..unclip import UnclipPipeline, is_unclip

    if not is_unclip(model):
        raise UserError(f"{model}: not an unCLIP model (make one with difusion unclip)")
    pipe = Pipeline.from_pretrained(model, pick_device(device))
    assert isinstance(pipe, UnclipPipeline)
    return pipe


def variations(
    image: Annotated[Path, typer.Argument(help="The picture to vary (any image file).")],
    model: Annotated[str, typer.Option(help="An unCLIP model folder (difusion unclip).")],
    n: Annotated[int, typer.Option("-n", help="Variations to draw.")] = 4,
    mix: Annotated[
        Path | None, typer.Option(help="A second picture: interpolate from IMAGE to it.")
    ] = None,
    weights: Annotated[
        str, typer.Option(help="With --mix: the points of the path (0 = IMAGE, 1 = --mix).")
    ] = "0,0.25,0.5,0.75,1",
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps (default: the model's).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance on the embedding (default: the model's).")
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="Sampler (default: the model's).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG strip to write.")] = Path(
        "variations.png"
    ),
    device: Device = "auto",
) -> None:
    """Variations of a picture from its CLIP image embedding (unCLIP), or with --mix the path
    between two pictures' embeddings, as a strip."""
    from ..images import auto_scale, grid, load_image

    if not 1 <= n <= 64:
        raise UserError(f"-n must be between 1 and 64, got {n}")
    try:
        points = [float(w) for w in weights.split(",")]
    except ValueError:
        raise UserError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    if any(not 0 <= w <= 1 for w in points):
        raise UserError(f"--weights must lie in [0, 1], got {weights!r}")
    check_output_file(output, (".png", ".jpg", ".jpeg", ".webp"))
    pictures = [load_image(p, 64) for p in (image, mix) if p is not None]
    pipe = unclip_pipeline(model, device)
    kwargs = dict(seed=seed, steps=steps, guidance=guidance, sampler=sampler)
    if mix is None:
        images = pipe.variations(pictures[0], n=n, **kwargs)
    else:
        images = pipe.variations(pictures[0], mix=pictures[1], weights=points, **kwargs)
    grid(images, cols=len(images), scale=auto_scale(pipe.image_size)).save(output)
    typer.echo(f"wrote {output} ({len(images)} images)")
