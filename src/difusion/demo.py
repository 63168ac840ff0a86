"""`make demo`: draw from the shipped text-to-image model in seconds.

Writes OUT/prompts.png (four images for each of a handful of prompts, 20 DPM-Solver++
steps) and OUT/trajectory.gif (the first prompt's images emerging from noise). Without a
shipped model it trains a small digits model for a couple of minutes and draws from that.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .checkpoints import CheckpointError
from .images import auto_scale, grid, save_gif, to_pil, trajectory_frame
from .model import DiffusionModel, default_model_path
from .pipeline import Pipeline
from .train import TrainConfig, train

PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a red circle above a blue square",
    "a yellow triangle to the left of a magenta circle",
    "a cyan square below a green circle",
]


def text_demo(out: Path) -> None:
    pipe = Pipeline.from_pretrained("default")
    scale = auto_scale(pipe.image_size)
    frames = []
    start = time.monotonic()
    x = pipe.sample(PROMPTS, n=4, steps=20, seed=0)
    seconds = time.monotonic() - start
    grid(to_pil(x), cols=4, scale=scale).save(out / "prompts.png")
    pipe.sample(PROMPTS[3], n=4, steps=20, seed=0, callback=lambda i, s, x0: frames.append(x0))
    save_gif([grid(to_pil(f), cols=4, scale=scale) for f in frames], out / "trajectory.gif", 150)
    print(f"{len(x)} images for {len(PROMPTS)} prompts in {seconds:.1f} s")
    print(f"wrote {out / 'prompts.png'} (rows: {'; '.join(PROMPTS)}) and {out / 'trajectory.gif'}")


def digits_demo(out: Path, minutes: float) -> None:
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    cfg = TrainConfig(
        data="digits", out=str(run), steps=100_000, minutes=minutes, batch_size=64, channels=32,
        attention_resolutions=(8,), lr=5e-4, sample_every=10**9,
    )  # fmt: skip
    train(cfg)
    model = DiffusionModel.load(run / "model.safetensors")
    scale = auto_scale(model.config.image_size)
    frames = []
    x = model.sample(
        36,
        sampler="dpmpp_2m",
        steps=20,
        seed=0,
        callback=lambda info: frames.append(trajectory_frame(info, scale)),
    )
    final = grid(to_pil(x), scale=scale)
    final.save(out / "samples.png")
    save_gif(frames + [final], out / "trajectory.gif")
    print(f"wrote {out / 'samples.png'} and {out / 'trajectory.gif'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--minutes", type=float, default=2.0, help="digits fallback budget")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        default_model_path()
    except CheckpointError:
        digits_demo(out, args.minutes)
    else:
        text_demo(out)


if __name__ == "__main__":
    main()
