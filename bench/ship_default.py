"""Copy a trained shapes text-to-image run into the package as the "default" model.

    .venv/bin/python bench/ship_default.py runs/shapes

Stores the EMA weights in float16 (half the size; loading returns float32) with the run's
training configuration and step in the metadata. `--guidance W` sets the guidance scale the
pipeline uses when a caller gives none (measure it first: `difusion eval RUN --alignment
--guidance W`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from difusion.model import DiffusionModel, read_metadata

TARGET = (
    Path(__file__).resolve().parents[1] / "src" / "difusion" / "weights" / "default.safetensors"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--trained-on", help="where and how it was trained (kept in the metadata)")
    parser.add_argument("--guidance", type=float, help="the model's default guidance scale")
    args = parser.parse_args()
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
    model.save(TARGET, extra, dtype=torch.float16)
    print(
        f"wrote {TARGET} ({TARGET.stat().st_size / 2**20:.1f} MiB, step {step}, "
        f"guidance {model.config.guidance:g})"
    )


if __name__ == "__main__":
    main()
