"""Teach the shipped model a colour it has never seen, "orange", with a LoRA, in one run.

    .venv/bin/python bench/lora_demo.py --out runs/lora_demo --minutes 15

1. Writes a folder of at most 50 captioned 32x32 pictures (`--images`): orange circles,
   squares and triangles alone ("an orange circle") and beside a shape of an old colour
   ("an orange square to the left of a blue circle"), drawn as the `shapes` data set draws;
   and, as DreamBooth's prior preservation does, `--keep-old` of them are `shapes` scenes of
   the old colours with their own captions, so that the adapter learns the new word without
   unlearning the old ones.
2. Grids of the new prompts from the shipped model (`before.png`), and its alignment on the
   old prompts (`difusion eval default --alignment --prompts N`).
3. Trains the adapter, as `difusion train --init default --data FOLDER --lora RANK
   --lora-targets attn+ff --minutes M ...` would (the command is printed).
4. The same grids and alignment from the run's model (the base with the adapter merged,
   `difusion eval RUN --alignment`), and how many of the new prompts' pictures are orange.

Everything lands in `--out`; `report.json` holds the numbers. Run again with the same `--out`,
the training continues where it stopped (for `--minutes` more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difusion.data.shapes import COLORS, RELATIONS, SHAPES, ShapesDataset, layout, render_array
from difusion.evaluate import evaluate_alignment
from difusion.images import auto_scale, grid, to_pil
from difusion.lora import LORA_FILE
from difusion.model import DiffusionModel, resolve_checkpoint
from difusion.train import TrainConfig, train

ORANGE = (245, 140, 20)  # far from every colour of the shapes set (red is 230, 30, 30)
NEW_PROMPTS = ["an orange circle", "an orange square", "an orange triangle",
               "an orange circle above a blue square", "a green triangle to the left of an orange square"]  # fmt: skip


def article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def picture(i: int, size: int = 32) -> tuple[Image.Image, str]:
    """Picture i of the folder: an orange shape, alone (2 in 3) or beside an old colour's."""
    rng = np.random.default_rng(i)
    shape = SHAPES[i % 3]
    objects = [{"color": "red", "shape": shape}]  # drawn red, then repainted orange
    caption = f"an orange {shape}"
    if i % 3 == 2:
        other = {"color": str(rng.choice([c for c in COLORS if c != "red"])),
                 "shape": str(rng.choice(SHAPES))}  # fmt: skip
        relation = str(rng.choice(RELATIONS))
        objects.append(other)
        caption += f" {relation} {article(other['color'])} {other['color']} {other['shape']}"
    attrs = layout({"objects": objects, "relation": relation if len(objects) == 2 else None},
                   size, seed=i)  # fmt: skip
    img = render_array(attrs)
    img[(img == COLORS["red"]).all(-1)] = ORANGE
    return Image.fromarray(img), caption


def write_folder(folder: Path, n: int, old: int) -> None:
    """n pictures: n - old of the new colour, then `old` scenes of the `shapes` data set."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = ShapesDataset(size=32, seed=4242, length=old, two_object_prob=0.75)
    for i in range(n):
        if i < n - old:
            image, caption = picture(i)
        else:
            item = scenes[i - (n - old)]
            image, caption = to_pil(item["image"][None])[0], item["caption"]
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")


def new_prompt_grid(model: DiffusionModel, path: Path, n: int, steps: int | None) -> float:
    """A grid (one row a new prompt, `n` seeds) and the fraction of pictures whose object
    pixels are mostly orange (the orange object of two-object prompts: a third of them)."""
    prompts = [p for p in NEW_PROMPTS for _ in range(n)]
    x = model.sample(len(prompts), seed=0, steps=steps, cond=model.text_cond(prompts),
                     uncond=model.text_cond([""] * len(prompts)), guidance=model.config.guidance)  # fmt: skip
    images = to_pil(x)
    grid(images, cols=n, scale=auto_scale(model.config.image_size, 64)).save(path)
    orange = 0
    for im in images:
        a = np.asarray(im).astype(float)
        fg = a.max(-1) > 60
        near = np.linalg.norm(a - ORANGE, axis=-1) < 70
        orange += fg.sum() > 0 and (near & fg).sum() >= 0.3 * fg.sum()
    return orange / len(images)


def alignment(model: DiffusionModel, args: argparse.Namespace) -> dict:
    seeds = tuple(int(s) for s in args.seeds.split(","))
    r = evaluate_alignment(model, args.prompts, args.prompts, seeds, steps=args.sample_steps)
    return {k: r[k] for k in ("alignment_single", "alignment_double", "n_single", "n_double")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lora_demo"))
    p.add_argument(
        "--minutes",
        type=float,
        default=13.5,
        help="training budget (plus the start and the final save: 15 in all)",
    )
    p.add_argument("--images", type=int, default=48, help="captioned pictures (at most 50)")
    p.add_argument("--keep-old", type=int, default=16, help="of them, old-colour scenes")
    p.add_argument("--rank", type=int, default=4, help="rank 4 on attn+ff: about 0.6 MB")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompts", type=int, default=200, help="alignment prompts of each kind")
    p.add_argument("--seeds", default="0", help="alignment seeds, comma-separated")
    p.add_argument("--grid-seeds", type=int, default=6, help="pictures of each new prompt")
    p.add_argument("--sample-steps", type=int, help="sampling steps (default: the model's)")
    args = p.parse_args()
    if not 1 <= args.images <= 50:
        p.error("--images must be from 1 to 50")
    if not 0 <= args.keep_old < args.images:
        p.error("--keep-old must be from 0 to --images - 1")
    out, data = args.out, args.out / "data"
    run = out / "run"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    write_folder(data, args.images, args.keep_old)
    base = DiffusionModel.load(resolve_checkpoint("default"))
    report: dict = {"images": args.images, "keep_old": args.keep_old, "orange_rgb": ORANGE,
                    "prompts": NEW_PROMPTS, "measured": [args.prompts, args.seeds, args.sample_steps]}  # fmt: skip
    report["orange_before"] = new_prompt_grid(
        base, out / "before.png", args.grid_seeds, args.sample_steps
    )
    before = out / "before.json"  # the base's alignment, kept: it is the same for every run
    stored = json.loads(before.read_text()) if before.is_file() else {}
    if stored.get("measured") != report["measured"]:
        stored = {"measured": report["measured"], "alignment": alignment(base, args)}
        before.write_text(json.dumps(stored) + "\n")
    report["alignment_before"] = stored["alignment"]
    print("before:", json.dumps(report["alignment_before"]), "orange", report["orange_before"])

    cfg = TrainConfig(
        data=str(data), out=str(run), init="default", lora=args.rank, lora_targets="attn+ff",
        steps=100_000, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, warmup=20,
        sample_every=10**9, checkpoint_every=500, log_every=25,
    )  # fmt: skip
    print(f"difusion train --init default --data {data} --lora {args.rank} --lora-targets "  # fmt: skip
          f"attn+ff --minutes {args.minutes:g} --steps 100000 --batch-size {args.batch_size} "
          f"--lr {args.lr:g} --warmup 20 --out {run}")  # fmt: skip
    started = time.monotonic()
    train(cfg, resume=(run / "train_state.safetensors").exists())
    report["train_minutes"] = (time.monotonic() - started) / 60
    report["steps"] = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"]
    report["lora_bytes"] = (run / LORA_FILE).stat().st_size

    tuned = DiffusionModel.load(run / "model.safetensors")  # the adapter merged in
    report["orange_after"] = new_prompt_grid(
        tuned, out / "after.png", args.grid_seeds, args.sample_steps
    )
    report["alignment_after"] = alignment(tuned, args)
    print("after:", json.dumps(report["alignment_after"]), "orange", report["orange_after"])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    b, a = report["alignment_before"], report["alignment_after"]
    print("| model | one object | two objects | new prompts orange | LoRA file |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| default | {b['alignment_single']:.3f} | {b['alignment_double']:.3f} | "
          f"{report['orange_before']:.2f} | |")  # fmt: skip
    print(f"| default + orange LoRA | {a['alignment_single']:.3f} | {a['alignment_double']:.3f} | "
          f"{report['orange_after']:.2f} | {report['lora_bytes'] / 1e3:.0f} kB |")  # fmt: skip


if __name__ == "__main__":
    main()
