"""`difusion lora ...`: LoRA files (see difusion.lora)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import UserError, check_output_file

lora_app = typer.Typer(help="LoRA adapters: merge them into a model.", no_args_is_help=True)


@lora_app.command()
def merge(
    model: Annotated[str, typer.Argument(help='"default", a run folder or a model file.')],
    loras: Annotated[
        list[str], typer.Argument(help="LoRA files, each FILE[:SCALE] (scale 1 if left out).")
    ],
    out: Annotated[Path, typer.Option(help="The merged model file (.safetensors).")],
) -> None:
    """Add LoRA adapters into a model's weights, for good: a plain model file again."""
    from ..lora import apply_loras, merged, parse_spec
    from ..model import SHIPPED, DiffusionModel, resolve_checkpoint
    from ..sd import is_sd_checkpoint

    check_output_file(out, (".safetensors",))
    if model not in SHIPPED and is_sd_checkpoint(model):
        raise UserError(
            f"{model}: merging into a Stable Diffusion checkpoint is not supported; apply the "
            "LoRA with --lora instead"
        )
    base = DiffusionModel.load(resolve_checkpoint(model))
    apply_loras(base, [parse_spec(spec) for spec in loras])
    merged(base).save(out, {"lora": ", ".join(loras)})
    typer.echo(f"wrote {out} ({model} with {len(loras)} LoRA merged)")
