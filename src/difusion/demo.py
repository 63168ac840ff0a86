"""`make demo`: train a small digits model for a couple of minutes, then draw from it.

Writes OUT/samples.png (a grid from 20 DPM-Solver++ steps) and OUT/trajectory.gif (the batch
emerging from noise). Run with --minutes to change the training budget.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .images import auto_scale, grid, save_gif, to_pil
from .model import DiffusionModel
from .train import TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--minutes", type=float, default=2.0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    cfg = TrainConfig(
        data="digits",
        out=str(run),
        steps=100_000,
        minutes=args.minutes,
        batch_size=64,
        channels=32,
        attention_resolutions=(8,),
        lr=5e-4,
        sample_every=10**9,
    )
    train(cfg)
    model = DiffusionModel.load(run / "model.safetensors")
    frames = []
    scale = auto_scale(model.config.image_size)

    def record(info: dict) -> None:
        frames.append(grid(to_pil(info["x"] / (1 + info["sigma"] ** 2) ** 0.5), scale=scale))

    start = time.monotonic()
    x = model.sample(36, sampler="dpmpp_2m", steps=20, seed=0, callback=record)
    seconds = time.monotonic() - start
    final = grid(to_pil(x), scale=scale)
    final.save(out / "samples.png")
    save_gif(frames + [final], out / "trajectory.gif")
    print(f"36 images in {seconds:.1f} s; wrote {out / 'samples.png'} and {out / 'trajectory.gif'}")


if __name__ == "__main__":
    main()
