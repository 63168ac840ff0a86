"""Has a text model learnt which way round a relation goes?

For two-object prompts ("a red circle above a blue square") it asks the model for its x0
estimate from pure-ish noise at a few noise levels and measures, along the relation's axis,
where the first object's colour lies against the second's (each pixel split into the two
colours by least squares). A model that has learnt the relation's direction puts the first
object on the named side more often than not, already at the highest noise, where the layout
is chosen; one that has not sits at 50%. The data set's own images are the reference (100%, about 15 px apart).

For a model with a layout map (`difusion train --layout-map`) it also reads the map itself
at an 8x8 grid, the colours it puts at each place, with the same measure.

A second table asks how much the conditional x0 estimate (same noise) moves when the prompt's
relation is inverted ("above" -> "below"), when its two objects trade places, and, for scale,
when one object's colour changes: a model blind to the direction barely moves for the first.

One minute per model on this 2-core CPU, much less noisy than scoring a few dozen samples:

    .venv/bin/python bench/relation_direction.py default runs/shapes-ft
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from difusion.data import shapes
from difusion.denoiser import bind, guided
from difusion.model import DiffusionModel, resolve_checkpoint

LEVELS = (999, 900, 700, 500)


Row = tuple[str, str, str, str, str]  # colour, shape, relation, colour, shape


def prompts() -> list[Row]:
    """Every ordered pair of colours with every relation, shapes taken in turn."""
    pairs = list(itertools.permutations(shapes.COLORS, 2))
    rows = []
    for i, (c1, c2) in enumerate(pairs):
        s1 = shapes.SHAPES[i % 3]
        s2 = shapes.SHAPES[(i + 1 + i // 3) % 3]
        rows += [(c1, s1, rel, c2, s2) for rel in shapes.RELATIONS]
    return rows


def spec(row: Row) -> dict:
    c1, s1, rel, c2, s2 = row
    return {"objects": [{"color": c1, "shape": s1}, {"color": c2, "shape": s2}], "relation": rel}


def captions(rows: list[Row], repeat: int = 1) -> list[str]:
    return [shapes.canonical_caption(spec(row)) for row in rows for _ in range(repeat)]


def x0_estimate(denoise, noise: torch.Tensor, model: DiffusionModel, t: int) -> torch.Tensor:
    """The denoiser's x0 estimate at timestep t, from `noise` scaled to its sigma."""
    sigma = float(model.schedule.t_to_sigma(torch.tensor(float(t))))
    return denoise(noise * sigma, torch.full((len(noise),), sigma))


def start_noise(model: DiffusionModel, n: int) -> torch.Tensor:
    size = model.config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def margin(image: torch.Tensor, c1: str, c2: str, relation: str) -> float:
    """Pixels between the two colours' centroids along the relation's axis, positive when
    the first is on the named side. Each pixel of image [3, H, W] (in [0, 1]) is split into
    amounts of the two colours by least squares: black is neither, a blend is some of each."""
    basis = torch.tensor([shapes.COLORS[c1], shapes.COLORS[c2]], dtype=torch.float32).T / 255
    amounts = (torch.linalg.pinv(basis) @ image.flatten(1)).clamp(min=0)  # [2, H * W]
    h, w = image.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")
    weight = amounts / (amounts.sum(1, keepdim=True) + 1e-8)
    centres = torch.stack([weight @ xs.flatten(), weight @ ys.flatten()], dim=1)  # [2, (x, y)]
    axis, sign = shapes.AXIS[relation]
    return sign * float(centres[1, axis] - centres[0, axis])


def summary(margins: list[float]) -> str:
    right = sum(m > 0 for m in margins)
    return f"{right}/{len(margins)} ({100 * right / len(margins):.1f}%), {np.mean(margins):+.2f} px"


def data_reference(rows: list[Row], seeds: int) -> str:
    margins = []
    for row in rows:
        c1, _, rel, c2, _ = row
        for seed in range(seeds):
            scene = shapes.layout(spec(row), seed=seed)
            image = torch.from_numpy(np.array(shapes.render(scene))).permute(2, 0, 1) / 255
            margins.append(margin(image.float(), c1, c2, rel))
    return summary(margins)


@torch.no_grad()
def model_rows(
    name: str, model: DiffusionModel, rows: list[Row], seeds: int, guidance: float | None
) -> list[str]:
    scale = model.config.guidance if guidance is None else guidance
    text = captions(rows, seeds)
    cond, uncond = model.text_cond(text), model.text_cond([""] * len(text))
    denoise = guided(model.denoiser(), cond, uncond, scale)
    noise = start_noise(model, len(text))
    out = []
    for t in LEVELS:
        x0 = x0_estimate(denoise, noise, model, t)
        images = (x0.clamp(-1, 1) + 1) / 2
        margins = [
            margin(images[i * seeds + k], c1, c2, rel)
            for i, (c1, _, rel, c2, _) in enumerate(rows)
            for k in range(seeds)
        ]
        sigma = float(model.schedule.t_to_sigma(torch.tensor(float(t))))
        out.append(f"| {name} | t={t} (sigma {sigma:.3g}) | w={scale:g} | {summary(margins)} |")
    return out


@torch.no_grad()
def layout_row(name: str, model: DiffusionModel, rows: list[Row]) -> str | None:
    """For a model with a layout map (`--layout-map`): the colours its map puts at each
    place of an 8x8 grid, measured like an x0 estimate."""
    if not model.config.unet.layout_map:
        return None
    cond = model.text_cond(captions(rows))
    image = model.unet.layout_map.image(8, 8, cond["context"], cond["context_mask"])
    images = (image.clamp(-1, 1) + 1) / 2
    margins = [margin(images[i], c1, c2, rel) for i, (c1, _, rel, c2, _) in enumerate(rows)]
    return f"| {name} | layout map (8x8 grid) | | {summary(margins)} |"


@torch.no_grad()
def sensitivity_rows(name: str, model: DiffusionModel, rows: list[Row]) -> list[str]:
    spare = {
        (c1, c2): next(c for c in shapes.COLORS if c not in (c1, c2)) for c1, *_, c2, _ in rows
    }
    variants = {
        "as asked": [(c1, s1, rel, c2, s2) for c1, s1, rel, c2, s2 in rows],
        "relation inverted": [
            (c1, s1, shapes.INVERSE[rel], c2, s2) for c1, s1, rel, c2, s2 in rows
        ],
        "objects swapped": [(c2, s2, rel, c1, s1) for c1, s1, rel, c2, s2 in rows],
        "a colour changed": [(c1, s1, rel, spare[c1, c2], s2) for c1, s1, rel, c2, s2 in rows],
    }
    conds = {k: model.text_cond(captions(v)) for k, v in variants.items()}
    denoise, noise = model.denoiser(), start_noise(model, len(rows))
    out = []
    for t in (LEVELS[0], LEVELS[2]):
        x0 = {k: x0_estimate(bind(denoise, c), noise, model, t) for k, c in conds.items()}
        rms = [(x0[k] - x0["as asked"]).square().mean().sqrt().item() for k in list(variants)[1:]]
        out.append(f"| {name} | t={t} | " + " | ".join(f"{r:.4f}" for r in rms) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help='"default", run folders or .safetensors files')
    parser.add_argument("--seeds", type=int, default=2, help="noise draws per prompt")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    args = parser.parse_args()
    rows = prompts()
    print(f"{len(rows)} prompts x {args.seeds} seeds: first object on the named side, mean margin")
    print("| model | noise level | guidance | right side, margin |\n| --- | --- | --- | --- |")
    print(f"| data set's images | | | {data_reference(rows, args.seeds)} |")
    models = {name: DiffusionModel.load(resolve_checkpoint(name)).eval() for name in args.models}
    for name, model in models.items():
        print("\n".join(model_rows(name, model, rows, args.seeds, args.guidance)), flush=True)
        if (row := layout_row(name, model, rows)) is not None:
            print(row, flush=True)
    print("\nrms change of the conditional x0 estimate (same noise), against the prompt as asked")
    print("| model | noise level | relation inverted | objects swapped | a colour changed |")
    print("| --- | --- | --- | --- | --- |")
    for name, model in models.items():
        print("\n".join(sensitivity_rows(name, model, rows)), flush=True)


if __name__ == "__main__":
    main()
