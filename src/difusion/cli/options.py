"""What the commands share: option types, the user error, and parsers of option values."""

from __future__ import annotations

import json
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
