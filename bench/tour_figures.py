"""The guides' figures (docs/guide.md, docs/guia.md), from the shipped models, into docs/tour/.

    .venv/bin/python bench/tour_figures.py          # or: make figures

escena.png: one `shapes` scene at 64 px ("un círculo rojo encima de un cuadrado azul");
../noise_linear.png, ../noise_cosine.png: that scene through the forward process
(`difusion noise`);
steps.png + steps.json: one prompt, four seeds, by DDPM in 1000 steps, DPM-Solver++ in 20 and
the distilled model's consistency sampler in 4, each labelled with its measured seconds;
prompts_es.png, trajectory_es.gif: Spanish prompts and a Spanish prompt's x0 estimate at each
step, by the model fine-tuned on English and Spanish captions ("default-bilingual"; as
bench/figures.py makes the English ones with "default"). Every figure is deterministic for its
seed; the seconds are this machine's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from difusion import Pipeline
from difusion.data.shapes import layout, render
from difusion.images import grid, labelled_strip, save_gif, to_pil

TOUR = Path(__file__).resolve().parents[1] / "docs" / "tour"
PROMPT_ES = "un círculo rojo encima de un cuadrado azul"
PROMPTS_ES = [
    "un círculo rojo",
    "un cuadrado azul",
    "un triángulo verde",
    "un círculo rojo encima de un cuadrado azul",
    "un triángulo amarillo a la izquierda de un círculo magenta",
    "un cuadrado cian debajo de un círculo verde",
]
SCENE = {
    "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
    "relation": "above",
}
STEPS = [("default", "ddpm", 1000), ("default", "dpmpp_2m", 20), ("default-fast", "lcm", 4)]


def noise_strips() -> None:
    from difusion.cli.images import noise

    render(layout(SCENE, size=64, seed=1)).save(TOUR / "escena.png")
    for schedule in ("linear", "cosine"):
        out = TOUR.parent / f"noise_{schedule}.png"
        noise(TOUR / "escena.png", schedule=schedule, output=out)


def steps_figure(prompt: str) -> None:
    columns, timings = [], []
    for model, sampler, steps in STEPS:
        pipe = Pipeline.from_pretrained(model)
        pipe.sample(prompt, n=4, steps=min(steps, 4), sampler=sampler, seed=1)  # warm up
        start = time.perf_counter()
        x = pipe.sample(prompt, n=4, steps=steps, sampler=sampler, seed=0)
        seconds = time.perf_counter() - start
        timings.append({"model": model, "sampler": sampler, "steps": steps, "seconds": seconds})
        columns.append((grid(to_pil(x), cols=2, scale=3), f"{sampler} {steps}\n{seconds:.1f} s"))
    labelled_strip([c for c, _ in columns], [label for _, label in columns]).save(
        TOUR / "steps.png"
    )
    record = {"prompt": prompt, "images": 4, "threads": torch.get_num_threads(), "runs": timings}
    (TOUR / "steps.json").write_text(json.dumps(record, indent=2) + "\n")


def spanish_prompts() -> None:
    pipe = Pipeline.from_pretrained("default-bilingual")
    x = pipe.sample(PROMPTS_ES, n=4, steps=20, seed=0)
    grid(to_pil(x), cols=4, scale=3).save(TOUR / "prompts_es.png")
    frames: list[torch.Tensor] = []
    pipe.sample(PROMPT_ES, n=4, steps=20, seed=0, callback=lambda i, s, x0: frames.append(x0))
    save_gif([grid(to_pil(f), cols=4, scale=3) for f in frames], TOUR / "trajectory_es.gif", 150)


def main() -> None:
    TOUR.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    noise_strips()
    spanish_prompts()
    steps_figure("a red circle above a blue square")
    print(f"wrote docs/tour/ in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
