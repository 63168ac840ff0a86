"""Every command of the CLI, every one of its options and arguments, a list of bad values:
each answered with one line on stderr and a non-zero exit, never a traceback.

Commands and options are read from the app itself, so a new one is covered with no edit
here; its bad values follow from its type (numbers) or its role (paths written or read).
Each case runs a small valid command line with one value replaced, so what a wrong value
slips past is cheap, and shows up as exit 0."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from difusion.cli import command_line, main
from difusion.data import DigitsDataset
from difusion.train import TrainConfig, train

COMMANDS = command_line().commands

# bad values by the option's type; numbers: not a number, negative, beyond 64 bits
BAD_NUMBERS = {int: ["abc", "-1", str(2**64)], float: ["abc", "-1", "nan"]}
BAD_TEXT = ["?bogus?"]
FREE_TEXT = {"negative", "api_key"}  # any text is a valid value of these
FILE_OUTPUTS = {"output", "gif"}  # files written: a folder, or a path below a file
FOLDER_OUTPUTS = {"out"}  # folders written: a file, or a path below a file


def small_command_lines(run: Path, image: Path, tmp: Path) -> dict[str, list[str]]:
    """A valid, quick command line of each command (a new command starts from none)."""
    train_arch = ["--channels", "8", "--channel-mult", "1,2", "--attention", "4"]
    return {
        "noise": [str(image), "--size", "8", "-o", str(tmp / "n.png")],
        "train": ["--data", "digits", "--size", "8", "--steps", "1", "--batch-size", "2",
                  *train_arch, "--layers-per-block", "1", "--out", str(tmp / "t")],
        "sample": [str(run), "-n", "1", "--steps", "1", "-o", str(tmp / "s.png")],
        "generate": ["7", "--model", str(run), "-n", "1", "--steps", "1",
                     "-o", str(tmp / "g.png")],
        "eval": [str(run), "-n", "4", "--steps", "1", "--data", "digits"],
        "compare": ["--data", "digits", "--budget-minutes", "0.01", "--seeds", "1",
                    "--preset", "tiny", "--samples", "8", "--curve-points", "1",
                    "--curve-samples", "8", "--steps-samples", "8", "--speed-batch", "1",
                    "--speed-repeats", "1", "--no-inception", "--out", str(tmp / "c")],
        "distill": [str(run), "--steps", "1", "--batch-size", "2", "--out", str(tmp / "d")],
        "serve": ["--model", str(run), "--port", str(free_port())],
    }  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_values(param, tmp: Path, a_file: Path) -> list[str]:
    kind = param.type_descriptor.annotation
    if kind in BAD_NUMBERS:
        return BAD_NUMBERS[kind]
    if param.name in FILE_OUTPUTS:
        return [str(tmp), str(a_file / "x.png")]
    if param.name in FOLDER_OUTPUTS:
        return [str(a_file), str(a_file / "x")]
    if kind is Path:
        return [str(tmp / "missing.png")]
    return [] if param.name in FREE_TEXT else BAD_TEXT


def cases() -> list[tuple[str, str]]:
    return [
        (name, param.name)
        for name, command in COMMANDS.items()
        for param in command.params
        if param.name != "help" and not getattr(param, "is_flag", False)
    ]


def replaced(line: list[str], param, value: str) -> list[str]:
    """`line` with `param` set to `value` (an argument: the first positional replaced)."""
    if param.param_type_name == "argument":
        return [value, *line[1:]] if line and not line[0].startswith("-") else [value, *line]
    out, skip = [], False
    for item in line:
        if skip:
            skip = False
        elif item in param.opts:
            skip = True
        else:
            out.append(item)
    return [*out, param.opts[-1], value]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table")
    cfg = TrainConfig(
        out=str(tmp / "run"), size=8, steps=1, batch_size=2, channels=16, channel_mult=(1, 2),
        attention_resolutions=(4,), layers_per_block=1, head_dim=16, cond="label",
    )  # fmt: skip
    run = train(cfg, dataset=DigitsDataset(size=8), progress=False)
    image = tmp / "in.png"
    Image.new("RGB", (12, 12), (200, 10, 10)).save(image)
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    return run, image, a_file


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int | None, str]:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # `serve` never blocks here
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["difusion", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


# a study takes a minute or more even this small: its line is run by hand (docs/cli.md)
@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"compare"}))
def test_the_small_command_lines_run(monkeypatch, capsys, tmp_path, world, command):
    """What the table's cases start from is valid: a refusal there is the bad value's."""
    run, image, _ = world
    lines = small_command_lines(run, image, tmp_path)
    if command not in lines:
        pytest.skip(f"{command} needs files of its own kind (a LoRA, an unCLIP model)")
    line = lines[command]
    code, err = run_main(monkeypatch, capsys, [command, *line])
    assert code in (0, None), err


@pytest.mark.parametrize("command,name", cases())
def test_every_bad_value_is_one_line(monkeypatch, capsys, tmp_path, world, command, name):
    run, image, a_file = world
    param = next(p for p in COMMANDS[command].params if p.name == name)
    line = small_command_lines(run, image, tmp_path).get(command, [])
    for value in bad_values(param, tmp_path, a_file):
        args = [command, *replaced(line, param, value)]
        code, err = run_main(monkeypatch, capsys, args)
        lines = err.strip().splitlines()
        assert code not in (0, None), f"{args}: accepted"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{args}: {err}"


def test_the_table_covers_every_command():
    assert {"noise", "train", "sample", "generate", "eval", "compare", "distill", "serve"} <= set(
        COMMANDS
    )
    assert len(cases()) > 100
