"""docs/unclip/report.md: unCLIP (prior + decoder) against a direct text model on the same
CLIP, trained for equal CPU time, in one command:

    .venv/bin/python bench/unclip_report.py --clip src/difusion/weights/clip --steps 250

Trains (or reuses, from `--work`) the `unclip` and `clip` designs of bench/equal_time.py and
writes, for both: alignment on the 200 + 200 prompts in English and Spanish by the exact
`shapes` scorer, the CLIP score, diversity, which design won on which measure, and pictures:
variations of held-out images and an interpolation strip.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from equal_time import LANGUAGES, add_arguments, measured, model_folder, trained

from difusion.data.shapes import ShapesDataset
from difusion.images import grid, to_pil
from difusion.pipeline import Pipeline

NAMES = {"unclip": "unCLIP", "clip": "direct text"}


def pictures(unclip: Pipeline, out: Path, seed: int) -> None:
    """Variations of held-out images (one and two objects), and an interpolation strip."""
    held_out = ShapesDataset(size=unclip.image_size, seed=12345, length=64)
    sources = [held_out[i] for i in range(6)]
    rows = []
    for item in sources:
        rows += [to_pil(item["image"][None])[0], *unclip.variations(item["image"], n=5, seed=seed)]
    scale = max(1, 64 // unclip.image_size)
    grid(rows, cols=6, scale=scale).save(out / "variations.png")
    a, b = sources[0]["image"], sources[3]["image"]
    strip = unclip.variations(a, mix=b, weights=[i / 7 for i in range(8)], seed=seed)
    grid(strip, cols=len(strip), scale=scale).save(out / "interpolation.png")


def steps_of(run: Path) -> int:
    return json.loads((run / "train_config.json").read_text())["steps"]


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def winner(a: float, b: float, higher: bool = True) -> str:
    if abs(a - b) < 1e-9:
        return "tie"
    return NAMES["unclip"] if (a > b) == higher else NAMES["clip"]


def rate_winner(a: float, b: float, n: int) -> str:
    """The higher pass rate, or "within noise" where the two differ by less than twice the
    standard error of their difference (binomial, n prompts each)."""
    se = ((a * (1 - a) + b * (1 - b)) / n) ** 0.5
    if abs(a - b) <= 2 * se:
        return f"within noise ({pct(a)} vs {pct(b)}, 2 s.e. = {pct(2 * se)})"
    return f"{winner(a, b)} ({pct(a)} vs {pct(b)})"


def write_report(path: Path, args, times: dict, results: dict, command: str) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    u, t = results["unclip"], results["clip"]
    lines = [
        "# unCLIP (prior + decoder) against a direct text model",
        "",
        f"Made by `{command}` on {machine}, one thread a run, torch {torch.__version__}. "
        f"CLIP: `{args.clip}`. Data: `shapes`, captioned in English and Spanish. Both designs "
        f"start from the U-Net of `{args.start}` (`--warm-start`: its weights, with the new "
        "condition's layers fresh) and train with the same recipe (bench/equal_time.py): "
        "the direct text model reads the CLIP text tower's per-token states through a layout "
        "map; the decoder reads the CLIP image embedding that the prior (trained from "
        "scratch) draws from the prompt's text embedding.",
        "",
        "## Training at equal time",
        "",
        f"The budget is {args.steps} steps of batch {args.batch_size} of the U-Net; unCLIP's "
        "prior trains first and its CPU time, priced at the text model's CPU time a step, is "
        "taken from the decoder's steps. The CPU seconds each design used are measured beside.",
        "",
        "| design | steps | CPU s | wall s |",
        "| --- | --- | --- | --- |",
        f"| unCLIP: prior + decoder | {steps_of(args.work / 'unclip' / 'prior')} + "
        f"{steps_of(args.work / 'unclip' / 'decoder')} | "
        f"{times['unclip']['cpu_s']:.0f} | {times['unclip']['wall_s']:.0f} |",
        f"| direct text model | {steps_of(args.work / 'clip')} | {times['clip']['cpu_s']:.0f} | "
        f"{times['clip']['wall_s']:.0f} |",
        "",
        "## Alignment (exact `shapes` scorer) and CLIP score",
        "",
        "One image a prompt, seed 0, the model's default sampler and guidance.",
        "",
        "| design | language | one object | two objects | n | CLIP score | CPU s / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lang in LANGUAGES:
        for name in NAMES:
            r = results[name][lang]
            lines.append(
                f"| {NAMES[name]} | {lang} | {pct(r['single'])} | {pct(r['double'])} | "
                f"{r['n_single']} + {r['n_double']} | {r['clip_score']:.3f} | "
                f"{r['cpu_s_per_image']:.3f} |"
            )
    lines += [
        "",
        "## Diversity",
        "",
        f"{args.diversity_k} images for each of {2 * args.diversity_prompts} prompts; the mean "
        "over pairs of images of one prompt.",
        "",
        "| design | CLIP-embedding distance (1 - cos) | pixel RMS distance | pairs |",
        "| --- | --- | --- | --- |",
    ]
    for name in NAMES:
        d = results[name]["diversity"]
        lines.append(
            f"| {NAMES[name]} | {d['clip_distance']:.4f} | {d['pixel_distance']:.4f} | "
            f"{d['pairs']} |"
        )
    verdicts = []
    for lang in LANGUAGES:
        for key, what in (("single", "one object"), ("double", "two objects")):
            a, b, n = u[lang][key], t[lang][key], u[lang]["n_" + key]
            verdicts.append(f"- alignment, {what} ({lang}): {rate_winner(a, b, n)}")
        verdicts.append(
            f"- CLIP score ({lang}): {winner(u[lang]['clip_score'], t[lang]['clip_score'])}"
        )
    for key, what in (("clip_distance", "CLIP-embedding"), ("pixel_distance", "pixel")):
        verdicts.append(
            f"- diversity ({what} distance): {winner(u['diversity'][key], t['diversity'][key])}"
        )
    lines += ["", "## Which design won", "", *verdicts, ""]
    lines += [
        "## Variations and interpolation",
        "",
        "Held-out `shapes` images (first column) and five variations of each, drawn by the "
        "decoder from the image's CLIP embedding:",
        "",
        "![variations](variations.png)",
        "",
        "The slerp from one held-out image's embedding to another's, one noise for all:",
        "",
        "![interpolation](interpolation.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    p.add_argument("--out", type=Path, default=Path("docs/unclip"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    times = {name: trained(args, args.work, name) for name in NAMES}
    results = {name: measured(args, args.work, name) for name in NAMES}
    unclip = Pipeline.from_pretrained(model_folder(args.work, "unclip"))
    pictures(unclip, args.out, args.seed)
    command = "python bench/unclip_report.py " + " ".join(sys.argv[1:])
    write_report(args.out / "report.md", args, times, results, command)
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
