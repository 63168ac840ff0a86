"""`difusion train --model decoder --clip FOLDER`: unCLIP's decoder is the project's U-Net
trained by train.py with cond="image": each image's own CLIP image embedding, projected to a
few context tokens and added to the timestep embedding, conditions it, and is dropped to zero
with probability --cond-drop (for guidance). Everything else, pixel or latent (--latent),
resume, budgets and checkpoints, is train.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

from .runs import TrainingError, given_options
from .train import TrainConfig, train

NOT_FOR_DECODER = (
    "cond", "text_encoder", "text_encoder_path", "layout_map", "layout_steps", "init",
)  # fmt: skip


def decoder_config_from_cli(options: dict, command: Callable) -> TrainConfig:
    from .cli.options import _ints, _key_values

    given = given_options(options, command, NOT_FOR_DECODER)
    if given:
        raise TrainingError(f"{', '.join(given)}: not an option of --model decoder")
    if not options.get("clip"):
        raise TrainingError("--model decoder needs --clip FOLDER (the CLIP it decodes)")
    names = {f.name for f in fields(TrainConfig)}
    picked = {k: v for k, v in options.items() if k in names and k not in NOT_FOR_DECODER}
    picked["out"] = str(options["out"])
    picked["channel_mult"] = _ints(options["channel_mult"], "--channel-mult")
    picked["attention_resolutions"] = _ints(options["attention"], "--attention")
    picked["data_options"] = _key_values(options.get("data_option") or [], "--data-option")
    return TrainConfig(**picked, cond="image")


def train_from_cli(options: dict, command: Callable) -> None:
    """`difusion train --model decoder --clip FOLDER`."""
    train(decoder_config_from_cli(options, command), resume=options["resume"])
