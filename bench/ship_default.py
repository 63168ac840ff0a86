"""Copy a trained run into the package as a shipped model: "default" (the shapes
text-to-image model) or, with `--name default-fast`, its distilled student.

    .venv/bin/python bench/ship_default.py runs/shapes
    .venv/bin/python bench/ship_default.py runs/default-fast --name default-fast

This OVERWRITES the tracked src/difusion/weights/NAME.safetensors (git keeps the old one:
`git checkout -- src/difusion/weights/` undoes it). Stores the EMA weights in float16 (half
the size; loading returns float32) with the run's training configuration and step in the
metadata. `--guidance W` sets the guidance scale the
pipeline uses when a caller gives none (measure it first: `difusion eval RUN --alignment
--guidance W`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from difusion.checkpoints import read_metadata
from difusion.model import SHIPPED, DiffusionModel

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "difusion" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--trained-on", help="where and how it was trained (kept in the metadata)")
    parser.add_argument("--guidance", type=float, help="the model's default guidance scale")
    parser.add_argument("--name", choices=SHIPPED, default="default", help="which shipped model")
    args = parser.parse_args()
    target = WEIGHTS / f"{args.name}.safetensors"
    model_file = args.run / "model.safetensors"
    step = read_metadata(model_file).get("step", "?")
    model = DiffusionModel.load(model_file)
    if args.guidance is not None:
        if args.guidance < 1:
            parser.error("--guidance must be at least 1 (1 = no guidance)")
        model.config.guidance = args.guidance
    train_config = json.loads((args.run / "train_config.json").read_text())
    extra = {"step": step, "train_config": json.dumps(train_config)}
    if args.trained_on:
        extra["trained_on"] = args.trained_on
    if target.exists():
        print(f"overwriting {target}")
    model.save(target, extra, dtype=torch.float16)
    print(
        f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB, step {step}, "
        f"guidance {model.config.guidance:g})"
    )


if __name__ == "__main__":
    main()
