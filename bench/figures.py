"""Figures of the shipped text-to-image model for the README and the pages under docs/.

    .venv/bin/python bench/figures.py

docs/guidance.png: one prompt at guidance w = 1, 2, 4, 7, 10 (columns; rows are seeds);
docs/shapes_prompts.png: four samples for each of the demo prompts;
docs/shapes_trajectory.gif: the x0 estimate at each of the 20 steps for one prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difusion import Pipeline
from difusion.demo import PROMPTS
from difusion.images import grid, labelled_strip, save_gif, to_pil

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPT = "a red circle above a blue square"
SCALES = (1, 2, 4, 7, 10)


def main() -> None:
    pipe = Pipeline.from_pretrained("default")
    columns = []
    for w in SCALES:
        x = pipe.sample(PROMPT, n=4, steps=20, guidance=w, seed=0)
        columns.append(grid(to_pil(x), cols=1, scale=3))
    labelled_strip(columns, [f"w = {w}" for w in SCALES]).save(DOCS / "guidance.png")
    x = pipe.sample(PROMPTS, n=4, steps=20, seed=0)
    grid(to_pil(x), cols=4, scale=3).save(DOCS / "shapes_prompts.png")
    frames: list[torch.Tensor] = []
    pipe.sample(PROMPT, n=4, steps=20, seed=0, callback=lambda i, s, x0: frames.append(x0))
    save_gif(
        [grid(to_pil(f), cols=4, scale=3) for f in frames], DOCS / "shapes_trajectory.gif", 150
    )
    print(
        f"wrote {DOCS / 'guidance.png'}, {DOCS / 'shapes_prompts.png'}, {DOCS / 'shapes_trajectory.gif'}"
    )


if __name__ == "__main__":
    main()
