"""The `difusion` command: one module per group of commands, registered here in help order."""

from __future__ import annotations

import sys
import warnings

import typer

from .images import generate, noise, sample
from .options import UserError
from .serving import serve
from .studies import compare, eval_
from .training import distill, train
from .unclip import unclip, variations

app = typer.Typer(
    help="Diffusion models from the noise schedule to text-to-image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (noise, train, sample, generate):
    app.command()(command)
app.command(name="eval")(eval_)
for command in (compare, distill, unclip, variations, serve):
    app.command()(command)

__all__ = ["UserError", "app", "main"]


def main() -> None:
    from ..checkpoints import CheckpointError
    from ..runs import TrainingError

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        app()  # standalone: typer reports usage errors itself (exit 2)
    except (UserError, ValueError, CheckpointError, TrainingError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
