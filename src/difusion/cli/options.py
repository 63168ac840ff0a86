"""What the commands share: option types, the user error, and parsers of option values."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

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
LoraFiles = Annotated[
    list[str] | None,
    typer.Option(
        "--lora", help="A LoRA file to apply, FILE[:SCALE] (scale 1 if left out); repeatable."
    ),
]

WeightsDtype = Annotated[
    str,
    typer.Option(
        help="The U-Net's weights: fp32, or bf16 (faster only on CPUs with AVX-512 bf16 or AMX, "
        "and on GPUs; the sampler stays fp32)."
    ),
]


class UserError(Exception):
    """Bad input: reported as one line, exit status 1."""


MAX_STEPS = 1000  # sampling steps: the schedule's own timesteps
MAX_NUMBER = 2**63 - 1  # what torch's seeds and sizes hold


def check_amount(ctx: Any, param: Any, value: Any) -> Any:
    """Every number option of every command (a parameter callback `difusion.cli` installs,
    so that a new option is checked with no line of its own): finite, from 0 to 2**63 - 1;
    no option of the command line takes a negative number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, got {value}")
        if value < 0:
            raise typer.BadParameter(f"must be 0 or more, got {value}")
        if value > MAX_NUMBER:
            raise typer.BadParameter(f"must be below 2**63, got {value}")
    return value


def given_on_command_line(names: list[str]) -> set[str]:
    """Which of the current command's parameters `names` the user gave (on the command line
    or by an environment variable); all of them when called outside a command line."""
    from typer._click.globals import get_current_context  # typer's own click

    ctx = get_current_context(silent=True)
    if ctx is None:
        return set(names)
    return {
        n
        for n in names
        if n in ctx.params and ctx.get_parameter_source(n).name not in ("DEFAULT", "DEFAULT_MAP")
    }


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None


def check_output_file(path: Path, suffixes: tuple[str, ...]) -> Path:
    """The one check of a file a command will write, made before the work: a name with one of
    `suffixes`, not a folder, below a folder (not a file) where this process can write (made
    when missing). A UserError says what is wrong with it."""
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: the output must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; name a file in it (e.g. {path / 'out'}{suffixes[0]})")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{path}: the file is read-only")
    check_output_folder(path.parent, what=f"{path}: ")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot make {path.parent} ({e.strerror})") from None
    return path


def check_output_folder(path: Path, what: str = "") -> Path:
    """The one check of a folder a command will write in (run folders, a study's folder),
    made before the work: a folder or nothing yet, below a folder where this process can
    write. Nothing is made."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}{path} is a file, not a folder")
    nearest = path
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UserError(f"{what}{nearest} is a file, not a folder")
    try:  # a real write: permissions, a read-only file system, quotas
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise UserError(f"{what}cannot write in {nearest} ({e.strerror})") from None
    return path


def check_sampling(steps: int | None, eta: float | None = None) -> None:
    """Sampling steps, when given, from 1 to MAX_STEPS (left out: the model's own); eta in
    [0, 1]."""
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise UserError(
            f"--steps must be from 1 to {MAX_STEPS}, got {steps} (leave it out for the model's own)"
        )
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta must be from 0 (deterministic) to 1 (as DDPM), got {eta}")


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


def _weights_dtype(name: str) -> torch.dtype:
    from ..pipeline import dtype_named

    try:
        return dtype_named(name)
    except ValueError:
        raise UserError(f"--dtype must be fp32 or bf16, got {name!r}") from None


# a command's option -> the field of the run configuration it sets, where the names differ
CONFIG_FIELDS = {"attention": "attention_resolutions", "data_option": "data_options"}


def _as_stored(name: str, value: Any) -> Any:
    """An option's value as a run's train_config.json holds it."""
    if name in ("channel_mult", "attention"):
        return list(_ints(value, "--" + name.replace("_", "-")))
    if name == "data_option":
        return _key_values(value or [], "--data-option")
    return json.loads(json.dumps(value, default=str))


def check_resume(out: Path, options: dict[str, Any], may_change: tuple[str, ...]) -> dict:
    """`--resume`: each option given on the command line against the configuration stored in
    the run. An option in `may_change` (the budget, the device, how often to log and save)
    takes the value given; where not given, the stored value wins: those are returned, to
    fill in. Any other option given must equal the stored value, and the steps (given or
    stored) must lie beyond the step the run is at."""
    from ..checkpoints import read_metadata
    from ..runs import Run

    run = Run(out)
    if not run.exists():
        return {}  # the trainer says there is nothing to resume
    metadata = read_metadata(run.state_path)
    stored = json.loads(metadata.get("train_config", "{}"))
    # train.py's configuration has no "model": its cond tells a decoder from a U-Net
    stored.setdefault("model", "decoder" if stored.get("cond") == "image" else "unet")
    step = int(metadata.get("step", 0))
    given = given_on_command_line(list(options))
    for name in sorted(given - {*may_change, "out", "resume"}):
        field = CONFIG_FIELDS.get(name, name)
        if field in stored and _as_stored(name, options[name]) != stored[field]:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} {options[name]}: the run in {out} was made with {stored[field]}; "
                f"a resumed run keeps its own (leave {flag} out)"
            )
    kept = {k: stored[k] for k in may_change if k not in given and k in stored and k != "out"}
    steps = options["steps"] if "steps" in given else stored.get("steps", step + 1)
    if steps < step:  # equal: a run cut short after its last step finishes its end
        raise UserError(
            f"the run in {out} is at step {step}: --steps {steps} leaves nothing to train "
            f"(give more steps to continue it)"
        )
    return kept
