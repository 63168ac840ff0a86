"""The `difusion` command: one module per group of commands, registered here in help order."""

from __future__ import annotations

import sys
import warnings

import typer
from typer._click import exceptions as usage  # the click typer runs on

from .adapters import lora_app
from .images import generate, noise, sample
from .options import UserError, check_amount
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
app.add_typer(lora_app, name="lora")

__all__ = ["UserError", "app", "command_line", "main"]


def command_line():
    """The app as click runs it, every number option checked by `check_amount`."""
    group = typer.main.get_command(app)
    for sub in group.commands.values():
        for param in sub.params:
            param.callback = check_amount if param.callback is None else param.callback
    return group


def main() -> None:
    from ..checkpoints import CheckpointError
    from ..runs import TrainingError

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        code = command_line().main(standalone_mode=False)
    except usage.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except usage.ClickException as e:  # a usage error: one line, and where the help is
        command = e.ctx.command_path if getattr(e, "ctx", None) else "difusion"
        typer.echo(f"error: {e.format_message()} (see {command} --help)", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (UserError, ValueError, CheckpointError, TrainingError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
