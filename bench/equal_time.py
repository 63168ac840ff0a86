"""Text-to-image designs trained for equal CPU time on `shapes` and measured alike.

    .venv/bin/python bench/equal_time.py --clip src/difusion/weights/clip --steps 250 \\
        --designs clip,unclip,minilm,scratch

Every design starts from the shipped model's U-Net (`--from`, default `default`) and trains
the same `--steps` of its U-Net on `shapes` captioned in English and Spanish
(`language=both`), with the recipe of the shipped model's last fine-tunes (batch 32, lr 2e-4,
plain v loss, bf16) and an EMA short enough for a short run (0.99). Equal steps of one
U-Net cost equal CPU time; each run's CPU seconds are measured beside it (the machine may be
shared, so steps are the budget rather than wall-clock minutes):

- `minilm`: the shipped MiniLM model itself fine-tuned (`--init`), the cheaper path;
- `clip`, `scratch`: a text model reading the per-token states of `--clip`'s text tower, or
  of an encoder trained with it, through a new layout map: `--warm-start` gives it the
  shipped U-Net's weights, its cross-attention's keys and values and the map start fresh;
- `unclip`: an unCLIP prior over `--clip` (from scratch, `--prior-steps`) and a decoder
  warm-started the same way for the steps the prior's CPU time leaves of the budget,
  packed into one model.

Each design is measured on the 200 + 200 alignment prompts in English and Spanish (the exact
`shapes` scorer, and the CLIP score: the cosine of the prompt's and the image's embeddings
under `--clip`) and on diversity (mean pairwise CLIP-embedding and pixel distance between
images of one prompt). Everything lands in `--work`: a run folder per design with its
`times.json` (CPU and wall seconds), and `DESIGN/measures.json`. A design already trained or
measured there is reused, so `--stage train` and `--stage measure` of different designs can
run at once, one process per core. bench/unclip_report.py and bench/clip_report.py format
these measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import torch

from difusion.alignment import prompt_set, score_batch
from difusion.pipeline import Pipeline
from difusion.prior_train import PriorTrainConfig, train_prior
from difusion.train import TrainConfig, train
from difusion.unclip import frozen_clip, pack

DESIGNS = ("unclip", "clip", "minilm", "scratch")
LANGUAGES = ("en", "es")
HUGE = 10**9  # never reached: no sample grids
DATA_OPTIONS = {"language": "both", "two_object_prob": 0.75}


def timed(fn, *args, **kwargs):
    """fn's result, and its CPU seconds (all threads) and wall seconds."""
    cpu, wall = time.process_time(), time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.process_time() - cpu, time.monotonic() - wall


def recipe(args) -> dict:
    return dict(
        data="shapes", steps=args.steps, batch_size=args.batch_size, lr=2e-4, ema_decay=0.99,
        warmup=20, min_snr_gamma=0.0, precision="bf16", log_every=25, sample_every=HUGE,
        checkpoint_every=250, data_options=DATA_OPTIONS, seed=args.seed,
    )  # fmt: skip


def text_model(args, folder: Path, encoder: str) -> None:
    if encoder == "minilm":
        cfg = TrainConfig(out=str(folder), init=args.start, **recipe(args))
    else:
        cfg = TrainConfig(
            out=str(folder), cond="text", text_encoder=encoder, warm_start=args.start,
            text_encoder_path=str(args.clip) if encoder == "clip" else None,
            layout_map=True, layout_steps=0, **recipe(args),
        )  # fmt: skip
    train(cfg, progress=False)


def unclip_model(args, folder: Path, seconds_per_step: float) -> None:
    """The prior, then the decoder for the U-Net steps the prior's CPU time leaves."""
    _, prior_cpu, _ = timed(
        train_prior,
        PriorTrainConfig(
            data="shapes", clip=str(args.clip), out=str(folder / "prior"), steps=args.prior_steps,
            batch_size=args.prior_batch_size, data_options=DATA_OPTIONS, log_every=50,
            sample_every=HUGE, checkpoint_every=500, seed=args.seed,
        ),
        progress=False,
    )  # fmt: skip
    steps = max(1, args.steps - round(prior_cpu / seconds_per_step))
    print(f"prior: {prior_cpu:.0f} CPU s; decoder: {steps} steps", file=sys.stderr, flush=True)
    train(
        TrainConfig(
            out=str(folder / "decoder"), cond="image", clip=str(args.clip),
            warm_start=args.start, **{**recipe(args), "steps": steps},
        ),
        progress=False,
    )  # fmt: skip
    pack(folder / "prior", folder / "decoder", folder / "model")


def model_folder(work: Path, design: str) -> Path:
    return work / design / "model" if design == "unclip" else work / design


def trained(args, work: Path, design: str) -> dict:
    """The design's CPU and wall seconds of training, training it first if it is not in `work`."""
    times_file = work / design / "times.json"
    if not times_file.is_file():
        print(f"training {design} ...", file=sys.stderr, flush=True)
        if design == "unclip":  # the text model's CPU time a step prices the prior's
            text = trained(args, work, "clip")
            job = lambda a, f: unclip_model(a, f, text["cpu_s"] / args.steps)  # noqa: E731
        else:
            job = lambda a, f: text_model(a, f, design)  # noqa: E731
        _, cpu, wall = timed(job, args, work / design)
        times_file.write_text(json.dumps({"cpu_s": cpu, "wall_s": wall, "steps": args.steps}))
    return json.loads(times_file.read_text())


@torch.no_grad()
def clip_score(clip, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine of each image's CLIP embedding with its prompt's."""
    scores = []
    for i in range(0, len(prompts), 100):
        img = clip.encode_image(images[i : i + 100])
        txt = clip.encode_text(prompts[i : i + 100])
        scores.append((img * txt).sum(-1))
    return torch.cat(scores)


def draw(
    pipe: Pipeline, prompts: list[str], seed: int, batch: int = 50, n: int = 1
) -> torch.Tensor:
    return torch.cat(
        [
            pipe.sample(prompts[i : i + batch], seed=seed + i, n=n)
            for i in range(0, len(prompts), batch)
        ]
    )


def diversity(clip, pipe: Pipeline, prompts: list[str], k: int, seed: int) -> dict:
    """Mean pairwise CLIP-embedding distance (1 - cos) and pixel RMS distance between k
    images of each prompt."""
    size = pipe.image_size
    x = draw(pipe, prompts, seed, batch=max(1, 50 // k), n=k).view(len(prompts), k, 3, size, size)
    emb_d, pix_d = [], []
    for images in x:
        e = clip.encode_image(images)
        for a, b in combinations(range(k), 2):
            emb_d.append(1 - float(e[a] @ e[b]))
            pix_d.append(float((images[a] - images[b]).pow(2).mean().sqrt()))
    return {"clip_distance": sum(emb_d) / len(emb_d), "pixel_distance": sum(pix_d) / len(pix_d),
            "pairs": len(emb_d)}  # fmt: skip


def measured(args, work: Path, design: str, clip=None) -> dict:
    """The design's alignment, CLIP score and diversity, measuring it first if needed."""
    file = work / design / "measures.json"
    if file.is_file():
        return json.loads(file.read_text())
    clip = clip or frozen_clip(str(args.clip))
    pipe = Pipeline.from_pretrained(model_folder(work, design))
    results: dict = {}
    for lang in LANGUAGES:
        prompts = prompt_set(args.n_single, args.n_double, seed=0, language=lang)
        x, cpu, _ = timed(draw, pipe, prompts, args.seed)
        s = score_batch(x, prompts)
        results[lang] = {
            "single": s["pass_rate_single"], "double": s["pass_rate_double"],
            "n_single": s["n_single"], "n_double": s["n_double"],
            "clip_score": float(clip_score(clip, x, prompts).mean()),
            "cpu_s_per_image": cpu / len(prompts),
        }  # fmt: skip
        print(design, lang, results[lang], file=sys.stderr, flush=True)
    few = prompt_set(args.diversity_prompts, args.diversity_prompts, seed=1)
    results["diversity"] = diversity(clip, pipe, few, args.diversity_k, args.seed)
    file.write_text(json.dumps(results, indent=2))
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", type=Path, required=True, help="the CLIP folder of every design")
    p.add_argument("--work", type=Path, default=Path("runs/equal_time"), help="runs (reused)")
    add_study_arguments(p)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """How the designs are trained and measured."""
    p.add_argument("--steps", type=int, default=250, help="U-Net steps of each design")
    p.add_argument(
        "--from", dest="start", default="default", help="the model every design starts from"
    )
    p.add_argument("--prior-steps", type=int, default=200, help="unCLIP's prior's steps")
    p.add_argument("--n-single", type=int, default=200)
    p.add_argument("--n-double", type=int, default=200)
    p.add_argument("--diversity-prompts", type=int, default=9, help="of each kind")
    p.add_argument("--diversity-k", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prior-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)


def designs(text: str) -> list[str]:
    names = [d for d in text.split(",") if d]
    unknown = [d for d in names if d not in DESIGNS]
    if unknown:
        raise SystemExit(f"--designs: unknown {', '.join(unknown)} (known: {', '.join(DESIGNS)})")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--stage", choices=("train", "measure", "both"), default="both")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for design in designs(args.designs):
        if args.stage in ("train", "both"):
            print(design, trained(args, args.work, design), flush=True)
        if args.stage in ("measure", "both"):
            print(design, measured(args, args.work, design), flush=True)


if __name__ == "__main__":
    main()
